"""The study report's figures, recomputed by hand from a constructed per-checkpoint table."""

import math

import pytest

from eval.evaluate import reward_gap
from sweeps.study_report import confirmed_table, fidelity_decides, hacked, markdown_table, over_seeds, plot_fronts, summarize

BASE = {"fid": 100.0, "heldout_quality": 0.80, "trained_quality": 0.50}


def row(method, seed, step, fid, heldout, trained):
    return {"method": method, "seed": seed, "trial": f"t{seed}", "step": step, "fid": fid, "heldout_quality": heldout, "trained_quality": trained}


def interval(value, low, high):
    return {"value": value, "low": low, "high": high}


def with_intervals(base_row, trained, heldout, ratio=None):
    return {**base_row, "intervals": {"trained_quality_diff": interval(*trained), "heldout_quality_diff": interval(*heldout),
                                      **({"fid_ratio": interval(*ratio)} if ratio else {})}}


UP, DOWN, LEVEL = (0.1, 0.05, 0.15), (-0.05, -0.08, -0.02), (-0.01, -0.03, 0.01)


def test_hacking_flag_with_paired_intervals_needs_each_change_at_95_percent():
    point = row("m", 0, 1, 95.0, 0.79, 0.60)  # on the point figures alone: reward up, held-out down

    def flag(trained, heldout, ratio=None, tolerance=0.1, lower_better=False):
        return hacked(with_intervals(point, trained, heldout, ratio), tolerance, lower_better)

    assert flag(UP, DOWN) is True  # the reward rose, the held-out score fell, both certain
    assert flag((0.02, -0.01, 0.05), DOWN) is False  # the reward's rise within noise
    assert flag(UP, LEVEL, (1.05, 0.95, 1.15)) is False  # held-out level, the FID ratio may be within 10%
    assert flag(UP, LEVEL, (1.30, 1.12, 1.50)) is True  # FID beyond the tolerance for sure
    assert flag(UP, LEVEL, (1.30, 1.12, 1.50), tolerance=0.2) is False  # ... but not beyond 20%
    assert flag((-0.1, -0.15, -0.05), DOWN, lower_better=True) is True  # a lower-is-better reward "rose"
    assert flag(UP, DOWN, lower_better=True) is False  # ... and that one fell
    assert flag(UP, LEVEL) is None  # the FID ratio decides and was not computed: not judged
    assert hacked(point, 0.1) is None  # no intervals (no per-sample data): not judged, though the point figures would flag it
    # the FID ratio is only needed where the quality intervals leave the flag open
    assert fidelity_decides({"trained_quality_diff": interval(*UP), "heldout_quality_diff": interval(*LEVEL)})
    assert not fidelity_decides({"trained_quality_diff": interval(*UP), "heldout_quality_diff": interval(*DOWN)})
    assert not fidelity_decides({"trained_quality_diff": interval(*LEVEL), "heldout_quality_diff": interval(*LEVEL)})


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
    assert over_seeds([0.01, 0.01, 0.01], 0.0, "greater")["verdict"] == "n/a"  # no spread: nothing to test against
    # ratios on the log scale: a hacked model's FID ratios of 7.5-22 are "worse" for sure (a symmetric
    # interval on the raw ratios, [-3.5, 32.5], would hold 1), reported as the geometric mean and its bounds
    hacked_ratios = over_seeds([7.5, 14.0, 22.0], 1.0, "less", log=True)
    logs = [math.log(r) for r in (7.5, 14.0, 22.0)]
    assert hacked_ratios["verdict"] == "worse" and hacked_ratios["mean"] == pytest.approx(math.exp(sum(logs) / 3))
    assert hacked_ratios["low"] == pytest.approx(math.exp(sum(logs) / 3 - stats.t.ppf(0.975, 2) * stats.sem(logs)))
    assert over_seeds([7.5, 14.0, 22.0], 1.0, "less")["verdict"] == "within noise"
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
    summary = summarize(rows, BASE, 0.1, picks=picks, baseline="baseline")
    acpo, baseline = summary["acpo"]["confirmed"], summary["baseline"]["confirmed"]
    assert acpo["seeds"] == [0, 1, 2] and acpo["confirmed_champions"] == 3 and baseline["confirmed_champions"] == 0
    assert acpo["gain_vs_base"]["mean"] == pytest.approx(0.014) and acpo["gain_vs_base"]["verdict"] == "better"
    assert baseline["gain_vs_base"]["verdict"] == "within noise" and "gain_vs_baseline" not in baseline
    assert acpo["gain_vs_baseline"]["mean"] == pytest.approx(0.014 - 0.0006667, abs=1e-6) and acpo["gain_vs_baseline"]["verdict"] == "better"
    assert acpo["fid_ratio_vs_base"]["verdict"] == "within noise"
    # ACPO's FID ratio over the baseline's, seed by seed: 1.02, 1.02, 1.03: higher on every seed, "worse"
    assert acpo["fid_ratio_vs_baseline"]["mean"] == pytest.approx((1.02 / 1.00 * 1.00 / 0.98 * 1.04 / 1.01) ** (1 / 3))
    assert acpo["fid_ratio_vs_baseline"]["verdict"] == "worse"
    table = confirmed_table(summary, [{"seed": 1000, "samples": 500}, {"seed": 1001, "samples": 500}])
    assert "| acpo | 3 | 3 of 3 | +0.0140 [" in table and "**better**" in table and "within noise" in table
    assert "- acpo, seed 1: trial t1 step 100: gain +0.0120 [+0.0100, +0.0140], FID ratio 1.000 [0.950, 1.050] (confirmed champion)" in table
    assert "confirmed" not in summarize(rows, BASE, 0.1)["acpo"]  # no picks: no confirmed figures


def test_summary_figures_agree_with_a_recomputation():
    rows = [
        row("acpo", 0, 100, 90.0, 0.90, 0.60), row("acpo", 0, 200, 95.0, 0.95, 0.70),
        row("acpo", 1, 100, 80.0, 0.85, 0.55), row("acpo", 1, 200, 120.0, 0.99, 0.80),
        row("reward_only", 0, 100, 300.0, 0.60, 0.99), row("reward_only", 1, 100, 98.0, 0.82, 0.51),
    ]
    # the hacking flag's intervals: acpo seed 1 step 200's FID ratio beyond 10% for sure, with its reward
    # up; the control's seed 0 held-out fall certain; its seed 1 without per-sample data (not judged)
    rows[3] = with_intervals(rows[3], UP, (0.19, 0.15, 0.23), (1.2, 1.12, 1.3))
    rows[4] = with_intervals(rows[4], UP, DOWN)
    for i in (0, 1, 2):
        rows[i] = with_intervals(rows[i], UP, (0.1, 0.05, 0.15), (0.95, 0.9, 1.05))
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
    assert control["hacking_unchecked"] == 1 and acpo["hacking_unchecked"] == 0
    assert "| acpo | 2 | 4 |" in table and "**yes**: 1 of 2 checkpoints (1 without per-sample data, not judged)" in table


def test_fronts_plot_is_written(tmp_path):
    rows = [row("a", 0, 1, 90.0, 0.9, 0.6), row("b", 0, 1, 95.0, 0.85, 0.7)]
    plot_fronts(rows, BASE, tmp_path / "fronts.png")
    assert (tmp_path / "fronts.png").stat().st_size > 1000
