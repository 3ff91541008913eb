"""Prompt-conditioned reward models, as far as they can be tested offline: PickScore's scoring on a
tiny random CLIP (the same code path as the real checkpoint), and a clear one-line failure where a
download or package is missing."""

import pytest
import torch

from eval.prompt_rewards import ClipPreference, load_prompt_reward
from eval.quality import QualityModel, check_quality_spec, load_quality_model


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from assets.digits_t2i import build_tokenizer

    tokenizer = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(config).eval(), tokenizer


def test_clip_preference_scores_each_image_against_its_prompt_with_gradients():
    model, tokenizer = tiny_clip()
    reward = QualityModel("pickscore-tiny", ClipPreference(model, tokenizer).requires_grad_(False), lower_better=False, in_channels=3,
                          prompt_conditioned=True)
    images = torch.rand(3, 1, 16, 16, requires_grad=True)
    scores = reward(images, ["a handwritten 1", "a thick handwritten 2", "a handwritten 1"])
    assert scores.shape == (3,)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # the reward can train the pixels
    same_image = images.detach()[:1].expand(2, -1, -1, -1)
    assert not torch.allclose(*reward(same_image, ["a handwritten 1", "a thick handwritten 2"]).unbind())  # the prompt matters


@pytest.mark.parametrize("name", ["imagereward", "pickscore", "hpsv2"])
def test_prompt_rewards_are_known_names_and_fail_offline_in_one_line(name):
    check_quality_spec(name, "metric")  # a known name passes config validation
    with pytest.raises(RuntimeError) as error:
        load_quality_model(name)
    message = str(error.value)
    assert name in message and "\n" not in message
    with pytest.raises(ValueError, match="unknown prompt-conditioned reward"):
        load_prompt_reward("imagereward-v9")
