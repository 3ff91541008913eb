"""The study report's figures, recomputed by hand from a constructed per-checkpoint table."""

import math

import pytest

from eval.evaluate import reward_gap
from sweeps.study_report import hacked, markdown_table, plot_fronts, summarize

BASE = {"fid": 100.0, "heldout_quality": 0.80, "trained_quality": 0.50}


def row(method, seed, step, fid, heldout, trained):
    return {"method": method, "seed": seed, "trial": f"t{seed}", "step": step, "fid": fid, "heldout_quality": heldout, "trained_quality": trained}


def test_hacking_flag_fires_when_the_trained_reward_rises_and_the_held_out_score_falls():
    assert hacked(row("m", 0, 1, 95.0, 0.70, 0.90), BASE, 0.1)  # reward up, held-out down
    assert hacked(row("m", 0, 1, 150.0, 0.85, 0.90), BASE, 0.1)  # reward up, FID far worse
    assert not hacked(row("m", 0, 1, 105.0, 0.85, 0.90), BASE, 0.1)  # both up, FID within the tolerance
    assert not hacked(row("m", 0, 1, 150.0, 0.70, 0.40), BASE, 0.1)  # everything worse, but the reward did not rise: not hacking
    assert hacked(row("m", 0, 1, 95.0, 0.70, 0.40), BASE, 0.1, trained_lower_better=True)  # a lower-is-better reward "rose"


def test_hacking_flag_ignores_changes_within_the_evaluation_noise():
    noise = {"fid": 10.0, "heldout_quality": 0.02, "trained_quality": 0.01}
    assert not hacked(row("m", 0, 1, 95.0, 0.79, 0.515), BASE, 0.1, noise=noise)  # reward up by 1.5 std only
    assert not hacked(row("m", 0, 1, 125.0, 0.79, 0.60), BASE, 0.1, noise=noise)  # FID past 110, not past 110 + 2 std
    assert not hacked(row("m", 0, 1, 95.0, 0.77, 0.60), BASE, 0.1, noise=noise)  # held-out down by 1.5 std
    assert hacked(row("m", 0, 1, 95.0, 0.75, 0.60), BASE, 0.1, noise=noise)  # reward up 10 std, held-out down 2.5 std
    assert hacked(row("m", 0, 1, 135.0, 0.80, 0.60), BASE, 0.1, noise=noise)  # FID past 110 + 2 std
    assert hacked(row("m", 0, 1, 95.0, 0.77, 0.60), BASE, 0.1, noise=noise, margin=1.0)  # a tighter margin


def test_summary_figures_agree_with_a_recomputation():
    rows = [
        row("acpo", 0, 100, 90.0, 0.90, 0.60), row("acpo", 0, 200, 95.0, 0.95, 0.70),
        row("acpo", 1, 100, 80.0, 0.85, 0.55), row("acpo", 1, 200, 120.0, 0.99, 0.80),
        row("reward_only", 0, 100, 300.0, 0.60, 0.99), row("reward_only", 1, 100, 98.0, 0.82, 0.51),
    ]
    summary = summarize(rows, BASE, fid_tolerance=0.1)
    acpo = summary["acpo"]
    # seed 0 front: (90, .90), (95, .95): area (95-90)*(.90-.80) + (100-95)*(.95-.80) = 0.5 + 0.75
    # seed 1 front: (80, .85), (120, .99) -- the second is not better than the base on FID: only (100-80)*(.85-.80) = 1.0
    assert acpo["hypervolume"][0] == pytest.approx((1.25 + 1.0) / 2)
    assert acpo["hypervolume"][1] == pytest.approx(math.sqrt(((1.25 - 1.125) ** 2 + (1.0 - 1.125) ** 2) / 1))
    assert acpo["best_fid"][0] == pytest.approx((90.0 + 80.0) / 2)
    assert acpo["best_heldout_within_tolerance"][0] == pytest.approx((0.95 + 0.85) / 2)  # (120, .99) is beyond FID 110
    gaps = [max(reward_gap(r, BASE) for r in rows[:2]), max(reward_gap(r, BASE) for r in rows[2:4])]
    assert gaps[0] == pytest.approx((0.70 - 0.5) / 0.5 - (0.95 - 0.8) / 0.8)
    assert acpo["reward_gap"][0] == pytest.approx(sum(gaps) / 2)
    assert [h["step"] for h in acpo["hacking"]] == [200] and acpo["hacking"][0]["seed"] == 1  # FID 120 > 110 with the reward up
    control = summary["reward_only"]
    assert [(h["seed"], h["fid"]) for h in control["hacking"]] == [(0, 300.0)]
    assert control["hypervolume"][0] == pytest.approx((0.0 + (100 - 98) * (0.82 - 0.80)) / 2)
    table = markdown_table(summary, BASE)
    assert "| acpo | 2 | 4 |" in table and "**yes**: 1 of 2 checkpoints" in table


def test_fronts_plot_is_written(tmp_path):
    rows = [row("a", 0, 1, 90.0, 0.9, 0.6), row("b", 0, 1, 95.0, 0.85, 0.7)]
    plot_fronts(rows, BASE, tmp_path / "fronts.png")
    assert (tmp_path / "fronts.png").stat().st_size > 1000
