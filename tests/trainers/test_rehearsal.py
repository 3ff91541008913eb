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
    assert (count(sd15.unet), count(sd15.vae), count(sd15.text_encoder)) == (859_520_964, 83_653_863, 123_060_480)
    assert count(rehearsal.build(rehearsal.CHURCH256, device="meta").unet) == 113_673_219


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
        assert model.unet(x, torch.tensor([10]), **conditioning).sample.shape == x.shape
    with pytest.raises(KeyError, match="no rehearsal architecture for 'sdxl'"):
        rehearsal.build("sdxl")
