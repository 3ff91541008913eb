"""`acpo assets build` re-creates every asset from scratch (a few steps each), loadable the real way."""

import json

import pytest
import torch

from assets.build import train_classifier
from eval.digits_fid import load_digits_classifier
from trainers.image_sets import DigitsDataset, digits_data_hash
from eval.quality import load_quality_model
from eval.sampling import sample_images
from sweeps.cli import main
from trainers.models import load_base_model


@pytest.mark.integration  # trains four models through the CLI: a minute or two
def test_quick_rebuild_writes_every_asset_and_card(tmp_path):
    out = tmp_path / "digits"
    assert main(["assets", "build", "--quick", "--out", str(out)]) == 0
    for card in ("classifier.json", "quality_cnniqa.json", "heldout_iqa.json", "base/card.json", "segmenter.json"):
        data = json.loads((out / card).read_text())
        assert data["data"]["data_hash"] == digits_data_hash() and data["recreate_with"] == "acpo assets build"

    heldout = DigitsDataset("heldout")
    classifier = load_digits_classifier(out / "classifier.safetensors")
    with torch.no_grad():
        accuracy = (classifier(heldout.images).argmax(1) == heldout.labels).float().mean().item()
    assert accuracy > 0.5  # 60 steps already learn far past chance (0.1)

    x = (heldout.images[:8] + 1) / 2
    for arch, name in (("cnniqa", "quality_cnniqa"), ("digits_heldout_iqa", "heldout_iqa")):
        assert load_quality_model({"arch": arch, "weights": str(out / f"{name}.safetensors")})(x).shape == (8,)
    base = load_base_model(out / "base")
    images = sample_images(base, 4, steps=2)
    assert images.shape == (4, 1, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_training_is_deterministic():
    a, _ = train_classifier(steps=5, seed=3)
    b, _ = train_classifier(steps=5, seed=3)
    c, _ = train_classifier(steps=5, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.integration  # VAE, UNet and figures through the CLI: ~15 s
def test_quick_t2i_rebuild_loads_as_a_stable_diffusion_pipeline(tmp_path, digits_assets):
    out = tmp_path / "digits-t2i"
    assert main(["assets", "build-t2i", "--quick", "--out", str(out), "--classifier", str(digits_assets / "classifier.safetensors")]) == 0
    card = json.loads((out / "base" / "card.json").read_text())
    assert card["data"]["data_hash"] == digits_data_hash() and "prompted_digit_fraction_guidance_3" in card["figures"]
    model = load_base_model(out / "base")
    assert model.text_conditioned and model.latent
    images = sample_images(model, 4, steps=2,
                           prompts=["a thick handwritten 7"], guidance_scale=3.0)
    assert images.shape == (4, 1, 16, 16)


@pytest.mark.integration  # VAE, transformer and figures through the CLI: ~15 s
def test_quick_flow_rebuild_loads_as_a_stable_diffusion_3_pipeline(tmp_path, digits_assets):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "digits-flow"
    assert main(["assets", "build-flow", "--quick", "--out", str(out), "--classifier", str(digits_assets / "classifier.safetensors")]) == 0
    card = json.loads((out / "base" / "card.json").read_text())
    assert card["data"]["data_hash"] == digits_data_hash() and "classifier_fid_vs_heldout_guidance_1" in card["figures"]
    assert card["training"]["vae"]["shift_factor"] != 0  # SD3's VAE kind: latents centred, then scaled
    # diffusers' own pipeline, as a user would load it: T5 left out (saved as absent), no T5 tokens
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "base", text_encoder_3=None, tokenizer_3=None)
    images = pipe("a thick handwritten 7", num_inference_steps=2, height=16, width=16, max_sequence_length=0, output_type="pt").images
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()
