"""The study report's figures, recomputed by hand from a constructed per-checkpoint table."""

import math

import pytest

from eval.evaluate import reward_gap
from sweeps.study_report import confirmed_table, fidelity_decides, hacked, markdown_table, over_seeds, plot_fronts, summarize

BASE = {"fid": 100.0, "heldout_quality": 0.80, "trained_quality": 0.50}


def row(method, seed, step, fid, heldout, trained):
    return {"method": method, "seed": seed, "trial": f"t{seed}", "step": step, "fid": fid, "heldout_quality": heldout, "trained_quality": trained}


def test_hacking_flag_fires_when_the_trained_reward_rises_and_the_held_out_score_falls():
    assert hacked(row("m", 0, 1, 95.0, 0.70, 0.90), BASE, 0.1)  # reward up, held-out down
    assert hacked(row("m", 0, 1, 150.0, 0.85, 0.90), BASE, 0.1)  # reward up, FID far worse
    assert not hacked(row("m", 0, 1, 105.0, 0.85, 0.90), BASE, 0.1)  # both up, FID within the tolerance
    assert not hacked(row("m", 0, 1, 150.0, 0.70, 0.40), BASE, 0.1)  # everything worse, but the reward did not rise: not hacking
    assert hacked(row("m", 0, 1, 95.0, 0.70, 0.40), BASE, 0.1, trained_lower_better=True)  # a lower-is-better reward "rose"


def interval(value, low, high):
    return {"value": value, "low": low, "high": high}


def test_hacking_flag_with_paired_intervals_needs_each_change_at_95_percent():
    def with_intervals(trained, heldout, ratio=None):
        return {**row("m", 0, 1, 95.0, 0.79, 0.60), "intervals": {"trained_quality_diff": interval(*trained), "heldout_quality_diff": interval(*heldout),
                                                                  **({"fid_ratio": interval(*ratio)} if ratio else {})}}

    up, down, level = (0.1, 0.05, 0.15), (-0.05, -0.08, -0.02), (-0.01, -0.03, 0.01)
    assert hacked(with_intervals(up, down), BASE, 0.1)  # the reward rose, the held-out score fell, both certain
    assert not hacked(with_intervals((0.02, -0.01, 0.05), down), BASE, 0.1)  # the reward's rise within noise
    assert not hacked(with_intervals(up, level, (1.05, 0.95, 1.15)), BASE, 0.1)  # held-out level, FID ratio may be within 10%
    assert hacked(with_intervals(up, level, (1.30, 1.12, 1.50)), BASE, 0.1)  # FID beyond the tolerance for sure
    assert not hacked(with_intervals(up, level, (1.30, 1.12, 1.50)), BASE, 0.2)  # ... but not beyond 20%
    # the point figures of these rows (held-out 0.79 < 0.80, trained 0.60 > 0.50) would flag every one
    assert hacked(row("m", 0, 1, 95.0, 0.79, 0.60), BASE, 0.1)
    # the FID ratio is only needed where the quality intervals leave the flag open
    assert fidelity_decides({"trained_quality_diff": interval(*up), "heldout_quality_diff": interval(*level)})
    assert not fidelity_decides({"trained_quality_diff": interval(*up), "heldout_quality_diff": interval(*down)})
    assert not fidelity_decides({"trained_quality_diff": interval(*level), "heldout_quality_diff": interval(*level)})


def test_over_seeds_is_scipys_t_test_and_says_within_noise_where_the_interval_holds_the_null():
    from scipy import stats

    gains = [0.010, 0.012, 0.011]
    figure = over_seeds(gains, 0.0, "greater")
    mean, sem = sum(gains) / 3, stats.sem(gains)
    half = stats.t.ppf(0.975, 2) * sem
    assert figure["mean"] == pytest.approx(mean) and figure["low"] == pytest.approx(mean - half) and figure["high"] == pytest.approx(mean + half)
    assert figure["verdict"] == "better" and figure["p"] < 0.01
    assert over_seeds([0.010, -0.008, 0.002], 0.0, "greater")["verdict"] == "within noise"
    assert over_seeds([-0.010, -0.012, -0.011], 0.0, "greater")["verdict"] == "worse"
    assert over_seeds([1.30, 1.25, 1.35], 1.0, "less")["verdict"] == "worse"  # an FID ratio above 1 for sure
    assert over_seeds([0.90, 0.92, 0.91], 1.0, "less")["verdict"] == "better"
    assert over_seeds([0.01], 0.0, "greater")["verdict"] == "n/a"  # one seed: no spread to test with
    # paired by seed: the method's gain minus the baseline's, seed by seed (the baseline's seed effects cancel)
    paired = over_seeds([0.015, 0.005, 0.025], 0.0, "greater", paired_with=[0.012, 0.0015, 0.0222])
    assert paired["mean"] == pytest.approx(0.0031) and paired["verdict"] == "better"  # +0.003 or so on every seed
    assert over_seeds([0.015, 0.005, 0.025], 0.0, "greater")["verdict"] == "within noise"  # unpaired against 0, the spread hides it


def test_confirmed_picks_are_compared_with_the_base_and_the_baseline():
    def pick(method, seed, gain, ratio, passed=False):
        return {"method": method, "seed": seed, "trial": f"t{seed}", "step": 100, "gain": interval(gain, gain - 0.002, gain + 0.002),
                "fid_ratio": interval(ratio, ratio - 0.05, ratio + 0.05), "passed": passed, "p_holm": 0.01 if passed else 0.5}

    picks = [pick("baseline", s, g, r) for s, g, r in ((0, 0.001, 1.00), (1, -0.001, 0.98), (2, 0.002, 1.01))]
    picks += [pick("acpo", s, g, r, True) for s, g, r in ((0, 0.014, 1.02), (1, 0.012, 1.00), (2, 0.016, 1.04))]
    rows = [row(m, s, 100, 95.0, 0.81, 0.55) for m in ("baseline", "acpo") for s in (0, 1, 2)]
    summary = summarize(rows, BASE, 0.1, picks=picks)
    acpo, baseline = summary["acpo"]["confirmed"], summary["baseline"]["confirmed"]
    assert acpo["seeds"] == [0, 1, 2] and acpo["confirmed_champions"] == 3 and baseline["confirmed_champions"] == 0
    assert acpo["gain_vs_base"]["mean"] == pytest.approx(0.014) and acpo["gain_vs_base"]["verdict"] == "better"
    assert baseline["gain_vs_base"]["verdict"] == "within noise" and "gain_vs_baseline" not in baseline
    assert acpo["gain_vs_baseline"]["mean"] == pytest.approx(0.014 - 0.0006667, abs=1e-6) and acpo["gain_vs_baseline"]["verdict"] == "better"
    assert acpo["fid_ratio_vs_base"]["verdict"] == "within noise"
    table = confirmed_table(summary, {"seed": 1, "samples": 500})
    assert "| acpo | 3 | 3 of 3 | +0.0140 [" in table and "**better**" in table and "within noise" in table
    assert "- acpo, seed 1: trial t1 step 100: gain +0.0120 [+0.0100, +0.0140], FID ratio 1.000 [0.950, 1.050] (confirmed champion)" in table
    assert "confirmed" not in summarize(rows, BASE, 0.1)["acpo"]  # no picks: no confirmed figures


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
