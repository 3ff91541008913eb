"""The hub models' architectures built offline with random weights (trainers/rehearsal.py): the
published parameter counts, CLIP's real tokenizer, and a build that saves and loads as a base model."""

import pytest
import torch

from trainers import rehearsal
from trainers.models import load_base_model, save_base_model


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_architectures_have_the_published_parameter_counts():
    # Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder, and the LSUN-256 DDPM, as the
    # hub's checkpoints hold them (a wrong block type, width or vocabulary changes the count)
    sd15 = rehearsal.build(rehearsal.SD15, device="meta")
    assert (count(sd15.denoiser), count(sd15.vae), count(sd15.text_encoder)) == (859_520_964, 83_653_863, 123_060_480)
    assert count(rehearsal.build(rehearsal.CHURCH256, device="meta").denoiser) == 113_673_219


def test_the_flow_architectures_are_the_published_configs():
    # SD3.5 Medium's MMDiT-X (24 blocks, the first 13 with a second self-attention, RMS q/k norm) and its
    # 16-channel VAE; FLUX.1-dev's 19 + 38 blocks with guidance embedding (the "12B" of its card: 11.9B).
    # The counts are those of the published configs: a wrong width, depth or block kind changes them.
    sd3 = rehearsal.build(rehearsal.SD3, device="meta")
    assert sd3.pipeline_kind == "sd3" and type(sd3.denoiser.transformer).__name__ == "SD3Transformer2DModel"
    assert (count(sd3.denoiser), count(sd3.vae), count(sd3.text_encoder), count(sd3.text_encoder_2)) == (
        2_243_171_520, 83_819_683, 123_650_304, 694_659_840)  # CLIP-L with its projection; bigG as SDXL's
    flux = rehearsal.build(rehearsal.FLUX, device="meta")
    assert flux.pipeline_kind == "flux" and count(flux.denoiser) == 11_901_408_320 and flux.denoiser.transformer.config.guidance_embeds


def test_flux_is_not_staged_on_this_machine(tmp_path, monkeypatch):
    from trainers.common.errors import ConfigError

    monkeypatch.setenv("ACPO_REHEARSAL_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="model.base: black-forest-labs/FLUX.1-dev is not rehearsed here: it needs its T5-XXL"):
        rehearsal.staged_base(rehearsal.FLUX, 256)


def test_the_tokenizer_is_clips_own():
    clip = pytest.importorskip("clip")
    tokenizer = rehearsal.clip_tokenizer()
    assert len(tokenizer) == 49_408 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49_406, 49_407)
    texts = ["a photo of a church", "A Photo   of two DOGS, running!", "supercalifragilistic"]
    expected = clip.tokenize(texts)
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for theirs, ours in zip(expected, ids):
        n = int((theirs != 0).sum())  # clip pads with 0, Stable Diffusion's tokenizer with end-of-text
        assert torch.equal(theirs[:n].long(), ours[:n])


def test_a_built_model_saves_and_loads_as_a_base_model(tmp_path):
    folder = save_base_model(rehearsal.build("tiny"), tmp_path / "tiny")
    model = load_base_model(folder)
    assert model.latent and model.text_conditioned
    conditioning = model.encode_prompt(["a church at dusk"])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert model.denoiser(x, torch.tensor([10]), **conditioning).sample.shape == x.shape
    with pytest.raises(KeyError, match="no rehearsal architecture for 'sdxl'"):
        rehearsal.build("sdxl")


def test_an_sd3_shaped_build_saves_loads_and_samples_through_its_pipeline_encoders(tmp_path):
    """SD3's kinds (MMDiT-X blocks, two CLIPs with projection and CLIP's real tokenizer, a 16-channel VAE
    with a shift, the flow scheduler), narrow: saved as StableDiffusion3Pipeline without T5, loaded back,
    prompts encoded by the pipeline's own encode_prompt (both CLIPs side by side, both pooled outputs)."""
    from eval.sampling import sample_images

    folder = save_base_model(rehearsal.build("tiny-sd3"), tmp_path / "tiny-sd3")
    assert '"StableDiffusion3Pipeline"' in (folder / "model_index.json").read_text()
    model = load_base_model(folder)
    assert model.pipeline_kind == "sd3" and model.resolution == 64 and model.text_encoder_3 is None
    conditioning = model.encode_prompt(["a church at dusk", ""])
    assert conditioning["encoder_hidden_states"].shape == (2, 77, 64) and conditioning["pooled_projections"].shape == (2, 64)
    images = sample_images(model, 2, steps=2,
                           prompts=["a church at dusk"], guidance_scale=5.0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


# ------------------------------------------------------------------ the stand-ins a rehearsal stages


def _tiny_clip_state(prefix: str = "clip_model.") -> dict:
    """OpenAI CLIP's architecture (clip/model.py), narrow, at random weights: what a weights file
    carrying its CLIP holds (the real vocabulary, so clip.tokenize's ids fit)."""
    from clip.model import CLIP

    torch.manual_seed(0)
    net = CLIP(32, 32, 1, 64, 16, 77, 49408, 64, 1, 1)  # widths of 64: clip.model.build_model infers 64-wide heads
    return {f"{prefix}{key}": value.float() for key, value in net.state_dict().items()}


def test_clip_based_metrics_load_from_a_weights_file_that_carries_their_clip(tmp_path):
    # pyiqa's laion_aes and clipscore call clip.load (a download) when built: with the CLIP in the file
    # nothing is fetched (tests run offline: a download would raise), and the scores depend on it
    from safetensors.torch import save_file

    from eval.quality import load_clip_score, load_quality_model

    clip_state = _tiny_clip_state()
    save_file(clip_state, tmp_path / "clipscore.safetensors")
    score = load_clip_score({"arch": "clipscore", "weights": str(tmp_path / "clipscore.safetensors")})
    images = torch.rand(2, 3, 40, 40)
    assert score(images, ["a church", "a dog"]).shape == (2,)

    from pyiqa.archs.laion_aes_arch import MLP

    torch.manual_seed(1)

    mlp = {f"mlp.{key}": value for key, value in MLP(32).state_dict().items()}
    save_file({**mlp, **clip_state}, tmp_path / "laion_aes.safetensors")
    aesthetic = load_quality_model({"arch": "laion_aes", "weights": str(tmp_path / "laion_aes.safetensors")})
    assert aesthetic.net.metric.net.clip_model[0].visual.input_resolution == 32  # the file's CLIP, not ViT-L/14
    scores = aesthetic(images)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]


def test_the_random_inception_separates_image_sets_and_is_never_unpickled(tmp_path, monkeypatch):
    # torch-fidelity's Inception at random weights (Kaiming): its FID tells two image sets apart (the default
    # init would give every image one feature vector); read from safetensors, torch.load is never called
    monkeypatch.setenv("ACPO_REHEARSAL_CACHE", str(tmp_path))
    from eval import fidelity

    weights = str(rehearsal.staged_inception())
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (unpickling) called"))
    fidelity._extractor.cache_clear()
    torch.manual_seed(0)
    noise, smooth = torch.rand(8, 3, 64, 64), torch.rand(8, 3, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    same = fidelity.features_metrics(fidelity.extract_features(noise, weights=weights), fidelity.extract_features(noise.flip(0), weights=weights), kid=False)
    apart = fidelity.features_metrics(fidelity.extract_features(noise, weights=weights), fidelity.extract_features(smooth, weights=weights), kid=False)
    fidelity._extractor.cache_clear()
    assert abs(same["fid"]) < 1e-3 < apart["fid"]


def test_a_rehearsal_of_a_hub_model_without_an_architecture_is_a_one_line_error():
    from sweeps.presets import load
    from trainers.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model.base: no rehearsal architecture for 'someone/else'"):
        load("sd15", ["model.rehearsal=true", "model.base=someone/else"])


def test_sdxl_has_its_published_parameter_counts():
    sdxl = rehearsal.build(rehearsal.SDXL, device="meta")
    assert (count(sdxl.denoiser), count(sdxl.text_encoder), count(sdxl.text_encoder_2)) == (2_567_463_684, 123_060_480, 694_659_840)


def test_an_sdxl_shaped_rehearsal_trains_samples_and_exports_as_sdxl(tmp_path):
    # SDXL's conditioning (both encoders' penultimate layers, the pooled projection, the size ids) through
    # the loop, the prompt cache, guidance, a LoRA checkpoint and its export as a StableDiffusionXLPipeline
    from diffusers import StableDiffusionXLPipeline

    from sweeps.champion import export_champion
    from sweeps.presets import load
    from trainers.loop import train

    cnniqa = "{arch: cnniqa, weights: assets/digits/quality_cnniqa.safetensors}"
    config, _ = load("sdxl", ["model.rehearsal=true", "model.base=tiny-xl", "data.resolution=64", "train.steps=2", "train.batch_size=2",
                              "train.gradient_accumulation=1", "data.workers=0", "train.use_gpu=false", "eval.samples=3",
                              "eval.sampling_steps=[2]", "eval.resamples=100", f"eval.trained_quality={cnniqa}",
                              f"eval.heldout_quality={cnniqa}", "eval.extra_quality={}", "eval.clip_score=''", "model.lora_rank=2",
                              f"objective={{denoise: 1.0, anchor: 1.0, nr_iqa: {{weight: 0.5, metric: {cnniqa}, x0: {{source: sampled, sampling_steps: 2}}}}}}",
                              f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'latents'}"])
    base = load_base_model(config.model.base)
    conditioning = base.encode_prompt(["a church", "a fox"])
    assert conditioning["encoder_hidden_states"].shape == (2, 77, 64)  # 32 + 32: the two encoders side by side
    assert conditioning["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    result = train(config, report=lambda *_: None)
    assert all(torch.isfinite(torch.tensor(value)) for key, value in result["metrics"].items() if key.startswith("loss"))
    exported = export_champion(result["checkpoint"], tmp_path / "export")
    pipe = StableDiffusionXLPipeline.from_pretrained(exported, use_safetensors=True)
    assert pipe("a fox", num_inference_steps=1, height=64, width=64, output_type="pt").images.shape == (1, 3, 64, 64)
