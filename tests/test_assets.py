"""The committed digits assets meet their quality bars, recomputed from the files (not read from the cards)."""

import json

import pytest
import torch

from assets.degradations import HELDOUT_FAMILY, TRAIN_FAMILY
from eval.digits_fid import FEATURE_EXTRACTOR_NAME, confident_fraction, load_digits_classifier
from eval.fidelity import fidelity_metrics
from trainers.image_sets import DigitsDataset
from assets.build import quality_spearman
from eval.quality import load_quality_model
from eval.sampling import sample_images
from trainers.models import load_base_model


@pytest.fixture(scope="module")
def heldout01():
    return (DigitsDataset("heldout").images + 1) / 2


def test_classifier_accuracy(digits_assets):
    model = load_digits_classifier(digits_assets / "classifier.safetensors")
    heldout = DigitsDataset("heldout")
    with torch.no_grad():
        accuracy = (model(heldout.images).argmax(1) == heldout.labels).float().mean().item()
    assert accuracy >= 0.97
    card = json.loads((digits_assets / "classifier.json").read_text())
    assert card["figures"]["heldout_accuracy"] == pytest.approx(accuracy, abs=1e-3)


def test_quality_model_through_pyiqa_ranks_training_degradations(digits_assets, heldout01):
    model = load_quality_model({"arch": "cnniqa", "weights": str(digits_assets / "quality_cnniqa.safetensors")})
    assert type(model.net.metric.net).__name__ == "CNNIQA"  # the real pyiqa architecture
    assert model.lower_better is False
    assert quality_spearman(model, heldout01, TRAIN_FAMILY) >= 0.9


def test_heldout_quality_model_ranks_its_own_family(digits_assets, heldout01):
    model = load_quality_model({"arch": "digits_heldout_iqa", "weights": str(digits_assets / "heldout_iqa.safetensors")})
    assert type(model.net).__name__ != "CNNIQA"
    assert quality_spearman(model, heldout01, HELDOUT_FAMILY) >= 0.9


@pytest.fixture(scope="module")
def base_figures(digits_assets, heldout01):
    """200 DDIM-50 samples from the base model, and 200 images of pure noise, on both yardsticks."""
    classifier_path = digits_assets / "classifier.safetensors"
    classifier = load_digits_classifier(classifier_path)
    base = load_base_model(digits_assets / "base")
    samples = sample_images(base, 200, steps=50, seed=1)
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    train01 = (DigitsDataset("train").images + 1) / 2

    def fid(x, ref):
        return fidelity_metrics(x, ref, FEATURE_EXTRACTOR_NAME, str(classifier_path), kid=False)["fid"]

    return {
        "samples": {"confident": confident_fraction(classifier, samples), "fid": fid(samples, heldout01)},
        "noise": {"confident": confident_fraction(classifier, noise), "fid": fid(noise, heldout01)},
        "real_fid": fid(heldout01, train01),
    }


def test_base_model_generates_digits(base_figures, digits_assets):
    card = json.loads((digits_assets / "base" / "card.json").read_text())["figures"]
    assert card["confident_fraction"] >= 0.8  # the bar, on 1,000 samples, when the asset was made
    assert base_figures["samples"]["confident"] >= 0.75  # re-measured on 200 other samples: same model, some sampling noise
    assert card["classifier_fid_samples_vs_heldout"] > 0 and card["classifier_fid_heldout_vs_train"] > 0


def test_pure_noise_scores_far_worse_on_both_figures(base_figures):
    samples, noise = base_figures["samples"], base_figures["noise"]
    assert noise["confident"] < samples["confident"] / 2
    assert noise["fid"] > 5 * samples["fid"]
    assert base_figures["real_fid"] < samples["fid"] < noise["fid"]


def test_segmenter_labels_held_out_digits(digits_assets):
    from objectives.segmenters import DigitsSegmenter
    from trainers.image_sets import digit_masks
    from trainers.common.weights import read_state_dict

    net = DigitsSegmenter()
    net.load_state_dict(read_state_dict(digits_assets / "segmenter.safetensors"))
    heldout = DigitsDataset("heldout")
    images01 = (heldout.images + 1) / 2
    with torch.no_grad():
        predicted = net.eval()(images01).argmax(1)
    truth = digit_masks(images01, heldout.labels)
    ious = [((truth == c) & (predicted == c)).sum().item() / ((truth == c) | (predicted == c)).sum().item() for c in range(11)]
    card = json.loads((digits_assets / "segmenter.json").read_text())["figures"]
    assert sum(ious) / 11 >= 0.8 and card["mean_iou_heldout"] == pytest.approx(sum(ious) / 11, abs=1e-3)


@pytest.fixture(scope="module")
def t2i_assets(digits_assets):
    return digits_assets.parent / "digits-t2i"


def test_digits_t2i_draws_the_prompted_digit_at_guidance_3(t2i_assets, digits_assets):
    """The bar: >= 80% of samples prompted "a handwritten D" are classified as D, recomputed from the
    committed files on 200 samples (the card's figure is on 500)."""
    model = load_base_model(t2i_assets / "base")
    assert type(model.denoiser).__name__ == "UNet2DConditionModel" and type(model.vae).__name__ == "AutoencoderKL"
    assert type(model.text_encoder).__name__ == "CLIPTextModel" and model.resolution == 16 and model.channels == 1
    classifier = load_digits_classifier(digits_assets / "classifier.safetensors")
    prompts = [f"a handwritten {d}" for d in range(10)]
    with torch.no_grad():
        images = sample_images(model, 200, steps=25, seed=1, prompts=prompts, guidance_scale=3.0)
        agreement = (classifier(images * 2 - 1).argmax(1) == torch.arange(200) % 10).float().mean().item()
    card = json.loads((t2i_assets / "base" / "card.json").read_text())
    assert agreement >= 0.8 and card["figures"]["prompted_digit_fraction_guidance_3"] >= 0.8
    assert card["figures"]["vae"]["reconstruction_mse_heldout_01"] > 0 and card["recreate_with"] == "acpo assets build-t2i"


def test_digits_flow_draws_the_prompted_digit_at_guidance_3_and_its_fid_is_the_cards(digits_assets):
    """The flow stand-in's bar, recomputed from the committed files on 200 samples of another seed bank
    (the card's are 500 of seed 0): >= 80% of samples prompted "a handwritten D" read as D at guidance 3;
    and the card's classifier FID against the held-out split at guidance 1, recomputed on its own bank."""
    from eval.digits_fid import FEATURE_EXTRACTOR_NAME
    from eval.fidelity import fidelity_metrics
    from trainers.image_sets import DigitsDataset

    folder = digits_assets.parent / "digits-flow" / "base"
    model = load_base_model(folder)
    assert type(model.denoiser.transformer).__name__ == "SD3Transformer2DModel" and model.pipeline_kind == "sd3"
    assert type(model.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and model.vae.config.latent_channels == 16
    assert type(model.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and model.text_encoder_3 is None
    classifier = load_digits_classifier(digits_assets / "classifier.safetensors")
    prompts = [f"a handwritten {d}" for d in range(10)]
    card = json.loads((folder / "card.json").read_text())
    with torch.no_grad():
        guided = sample_images(model, 200, steps=25, seed=1,
                               prompts=prompts, guidance_scale=3.0)
        plain = sample_images(model, 500, steps=25, seed=0,
                              prompts=prompts)
    agreement = (classifier(guided * 2 - 1).argmax(1) == torch.arange(200) % 10).float().mean().item()
    assert agreement >= 0.8 and card["figures"]["prompted_digit_fraction_guidance_3"] >= 0.8
    heldout = (DigitsDataset("heldout").images + 1) / 2
    fid = fidelity_metrics(plain, heldout, FEATURE_EXTRACTOR_NAME, str(digits_assets / "classifier.safetensors"), kid=False)["fid"]
    assert fid == pytest.approx(card["figures"]["classifier_fid_vs_heldout_guidance_1"], abs=0.01)
    assert card["recreate_with"] == "acpo assets build-flow" and card["architecture"]["transformer_parameters"] > 1_000_000
