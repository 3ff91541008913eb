"""The champion rule that knows its noise (sweeps/selection.py, sweeps/confirm.py): the null test
of issue 27, and told-apart cases, on stand-in per-sample data with a known truth."""

import torch
from torch_fidelity.metric_fid import fid_features_to_statistics

from eval.fidelity import features_metrics, fid_from_features
from eval.intervals import PerSample
from sweeps.confirm import judge
from sweeps.selection import Fidelity, confident_champion, holm, pareto_front, screening_order, select_champion
from tests.stand_in_samples import REFERENCE, draw

REFERENCE_STATISTICS = fid_features_to_statistics(REFERENCE)
TOLERANCE = Fidelity("fid", 0.1)


def row(name: str, data) -> dict:
    return {"checkpoint": name, "fid": fid_from_features(data.features, REFERENCE_STATISTICS),
            "heldout_quality": float(data.scores["heldout_quality"].mean())}


def confirm(candidates: dict, base, seed: int, fidelity: Fidelity = TOLERANCE, resamples: int = 300) -> tuple[dict | None, list[dict]]:
    entries = [{"checkpoint": name, **judge(data, base, REFERENCE, fidelity, resamples, seed)} for name, data in candidates.items()]
    champion, _, _ = confident_champion(entries, fidelity=fidelity)
    return champion, entries


def test_copies_of_the_base_model_under_other_noise_yield_no_champion():
    """Six "checkpoints" that are the base model itself, each sampled with other noise: the screening
    rule crowns one in every repetition, and its figures beat the base's (the winner's curse); the
    confirmation on fresh noise crowns none in at least 19 of 20 repetitions."""
    old_rule_picks, lucky, new_rule_picks = 0, 0, 0
    for r in range(20):
        seed = 1000 * r
        base_row = row("base", draw(300, seed))
        rows = [row(f"copy{i}", draw(300, seed + 1 + i)) for i in range(6)]
        choice, _ = select_champion(rows, base_row, TOLERANCE)
        old_rule_picks += choice is not None
        lucky += choice is not None and choice["heldout_quality"] > base_row["heldout_quality"]
        top = screening_order(pareto_front(rows), base_row, TOLERANCE)[:3]
        # confirmed on a fresh bank: the base, and each candidate (the base model again: other fresh noise)
        champion, _ = confirm({c["checkpoint"]: draw(600, seed + 100 + i) for i, c in enumerate(top)}, draw(600, seed + 99), seed)
        new_rule_picks += champion is not None
    assert old_rule_picks == 20 and lucky >= 15
    assert new_rule_picks <= 1, new_rule_picks


def fine_tuned(base, seed: int, shift: float = 0.0, gain: float = 0.0):
    """A fine-tuning of `base` sampled from the same bank: sample i near the base's sample i (what
    common random numbers give a checkpoint that moved a little), moved by `shift` and `gain`."""
    g = torch.Generator().manual_seed(seed)
    return PerSample(base.features + shift + 0.05 * torch.randn(base.features.shape, generator=g),
                     {"heldout_quality": base.scores["heldout_quality"] + gain + 0.01 * torch.randn(len(base), generator=g)})


def test_a_better_and_a_worse_checkpoint_are_told_apart():
    """Fine-tunings sampled from the base's bank: one better on held-out quality at the same fidelity,
    one better still on quality but far from the reference (FID ratio ~3), one that changed nothing:
    the better one is the champion, the worse one fails on fidelity, the unchanged one on gain."""
    base = draw(600, 5)
    champion, entries = confirm({"better": fine_tuned(base, 6, gain=0.005), "worse": fine_tuned(base, 7, shift=0.6, gain=0.05),
                                 "unchanged": fine_tuned(base, 8)}, base, seed=1)
    by_name = {e["checkpoint"]: e for e in entries}
    assert champion is not None and champion["checkpoint"] == "better"
    assert by_name["better"]["gain_low"] > 0 and by_name["better"]["p_gain"] < 0.01
    assert by_name["worse"]["p_gain"] < 0.01 and by_name["worse"]["p_fidelity"] > 0.5  # its gain is real, its FID is not within
    assert by_name["unchanged"]["p_gain"] > 0.01


def test_on_the_kid_axis_a_better_and_a_worse_checkpoint_are_told_apart():
    """The same fine-tunings judged on KID (`sweep.fidelity: kid`, an absolute tolerance): the far one
    fails on its KID difference, the better one passes, and the figures judged are KID's, not FID's."""
    base = draw(600, 5)
    base_kid = features_metrics(base.features, REFERENCE)["kid"]
    fidelity = Fidelity("kid", max(0.05, 0.5 * abs(base_kid)))  # KID <= the base's + half of it
    champion, entries = confirm({"better": fine_tuned(base, 6, gain=0.005), "worse": fine_tuned(base, 7, shift=0.6, gain=0.05)},
                                base, seed=1, fidelity=fidelity, resamples=100)  # KID's bootstrap costs ~3x FID's
    by_name = {e["checkpoint"]: e for e in entries}
    assert champion is not None and champion["checkpoint"] == "better"
    assert by_name["worse"]["p_fidelity"] > 0.5 and by_name["worse"]["confirmation"]["kid_diff"]["low"] > fidelity.tolerance
    assert "kid_diff" in by_name["better"]["confirmation"] and "fid_ratio" not in by_name["better"]["confirmation"]


def test_holm():
    """Holm's adjusted p-values (worked by hand): sorted 0.01, 0.02, 0.04 times 3, 2, 1, made monotone."""
    assert holm([0.04, 0.01, 0.02]) == [0.04, 0.03, 0.04]
    assert holm([0.5]) == [0.5] and holm([]) == []
    assert holm([0.6, 0.01]) == [0.6, 0.02]
