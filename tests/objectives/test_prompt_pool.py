import pytest
import torch

from objectives.prompt_pool import PromptPool, read_prompts, word_distance

PROMPTS = ["a red car", "a red car at night", "a bowl of soup", "mountains under snow", "a portrait of a cat"]


def test_unseen_prompts_come_first():
    pool = PromptPool(PROMPTS)
    pool.update(["a red car", "a bowl of soup"], torch.tensor([1.0, 1.0]))
    chosen = pool.select(3, torch.Generator().manual_seed(0))
    assert set(chosen) == {"a red car at night", "mountains under snow", "a portrait of a cat"}


def test_saturated_prompts_are_skipped_and_near_duplicates_are_not_paired():
    pool = PromptPool(PROMPTS, saturation=0.0)
    pool.update(PROMPTS, torch.tensor([0.9, 0.8, 0.0, 0.5, 0.1]))  # "a bowl of soup" met its targets
    chosen = pool.select(2, torch.Generator().manual_seed(0))
    assert chosen[0] == "a red car"  # the worst rewarded
    assert "a bowl of soup" not in chosen
    assert "a red car at night" not in chosen  # second-worst, but nearly the same words as the first
    assert chosen[1] == "mountains under snow"


def test_state_round_trips_with_unseen_prompts():
    pool = PromptPool(PROMPTS)
    pool.update(["a red car"], torch.tensor([0.3]))
    clone = PromptPool(PROMPTS)
    clone.load_state_dict(pool.state_dict())
    assert clone.loss == pool.loss and clone.loss[1] is None


def test_word_distance_and_prompt_files(tmp_path):
    assert word_distance("a red car", "A red car") == 0.0 and word_distance("red", "blue") == 1.0
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompts(tmp_path / "none.txt")
    with pytest.raises(ValueError, match="empty"):
        read_prompts([])
