"""The report of a study (several methods, each swept under the same budget and seeds): pure
functions over the per-checkpoint table, then the files (Markdown, a self-contained HTML page, PNGs).

A row of the table is one evaluated checkpoint: `method`, `seed`, `trial`, `step`, `fid`,
`heldout_quality`, `trained_quality` (and whatever else the checkpoint's metrics hold). `base` is
the base model's row. Every figure of the report is computed here from those rows, so a test can
recompute it from the same table:

- hypervolume of each (method, seed)'s front against the base point (`sweeps.selection`), mean and
  spread over seeds;
- best FID, and best held-out quality among checkpoints within the FID tolerance;
- the reward gap of a checkpoint (`eval.evaluate.reward_gap`): the trained reward's gain minus the
  held-out score's gain, each relative to its base value (`(r - r_base) / |r_base|`, signs turned so
  a gain is positive): large when the optimised reward rises and the held-out judge does not. Per
  seed the largest gap over the method's checkpoints, then mean and spread over seeds;
- the reward-hacking flag: a checkpoint whose trained reward rose while its held-out quality fell,
  or its FID got worse than the tolerance allows, each at 95% confidence: from the checkpoint's
  paired-bootstrap intervals against the base on the screening bank (`row["intervals"]`,
  eval/intervals.py; without them the checkpoint is not judged). Each checkpoint is tested on its
  own: of a dozen checkpoints whose reward truly rises, one may be flagged by chance;
- the confirmed pick: each (method, seed) sweep's pick (the head of its screening order: the best
  held-out quality within the FID tolerance, else the lowest FID) re-measured with the base on a
  seed bank the search never saw (sweeps/confirm.py; `picks`): its held-out gain and FID ratio
  with their paired intervals, then over seeds a t-test against the base (gain 0, ratio 1: on the
  log scale) and, seed by seed, against `baseline`'s pick: "better", "worse", or "within noise"
  where the 95% interval holds no change. Seeds pair the methods by their training seed, their
  search's seed and their confirmation bank; methods with different spaces share little else.
"""

from __future__ import annotations

import math
import statistics

from eval.evaluate import reward_gap
from sweeps.selection import hypervolume, pareto_front


def _rose(intervals: dict, trained_lower_better: bool) -> bool:
    trained = intervals["trained_quality_diff"]
    return trained["high"] < 0 if trained_lower_better else trained["low"] > 0


def fidelity_decides(intervals: dict, trained_lower_better: bool = False) -> bool:
    """Whether the hacking flag needs the FID ratio's interval for these quality intervals: the trained
    reward rose and the held-out score did not fall (FID's bootstrap is costly; otherwise it is not read)."""
    return _rose(intervals, trained_lower_better) and not intervals["heldout_quality_diff"]["high"] < 0


def hacked(row: dict, fid_tolerance: float, trained_lower_better: bool = False) -> bool | None:
    """The trained reward rose while the held-out score fell or FID got worse than the tolerance allows,
    each change at 95% confidence (its interval clear of no change), from the row's paired intervals
    against the base on the screening bank (`row["intervals"]`: `trained_quality_diff`,
    `heldout_quality_diff` and, where `fidelity_decides`, `fid_ratio`, each {value, low, high}).
    None where they are missing (a checkpoint evaluated before per-sample data was kept): the point
    figures alone would flag noise (at a few hundred samples FID moves by ~15% with the seed)."""
    intervals = row.get("intervals")
    if not intervals:
        return None
    if not fidelity_decides(intervals, trained_lower_better):
        return _rose(intervals, trained_lower_better)  # rose: the held-out score fell for sure; else not hacking
    if "fid_ratio" not in intervals:
        return None
    return intervals["fid_ratio"]["low"] > 1 + fid_tolerance


def verdict(low: float, high: float, null: float, better: str) -> str:
    """An interval read against its null: "better" / "worse" where it is clear of it (`better`: the
    direction that is), "within noise" where it holds it, "n/a" where there is none."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    if low > null:
        return "better" if better == "greater" else "worse"
    if high < null:
        return "worse" if better == "greater" else "better"
    return "within noise"


def over_seeds(values: list[float], null: float, better: str, paired_with: list[float] | None = None, log: bool = False) -> dict:
    """The mean over seeds with its 95% t-interval, the two-sided p-value against `null`, and the
    verdict. With `paired_with` (the baseline's value at each seed): of the seed-by-seed differences
    against none, the mean and bounds then the difference's (a paired t-test is the one-sample test
    of the differences: scipy's `ttest_rel` is `ttest_1samp` of them). `log`: for ratios, tested on
    their logarithm (a ratio is multiplicative and skewed: a hacked model's FID ratios of 7-60 would
    hide the null in a symmetric interval), the mean and bounds given back as ratios (paired: the
    ratio of the ratios, none = 1). Fewer than two seeds, or no spread between them: the mean alone, "n/a"."""
    from scipy.stats import ttest_1samp

    scale = math.log if log else float
    back = math.exp if log else float
    offset = 0.0 if paired_with is not None else scale(null)  # what the differences are taken from
    differences = ([scale(a) - scale(b) for a, b in zip(values, paired_with)] if paired_with is not None
                   else [scale(a) - offset for a in values])
    out = {"mean": back(statistics.fmean(differences) + offset) if differences else math.nan, "low": math.nan, "high": math.nan,
           "p": math.nan, "seeds": len(differences), "null": back(offset) if paired_with is None else back(0.0), "verdict": "n/a"}
    if len(differences) < 2 or statistics.pstdev(differences) == 0:
        return out
    test = ttest_1samp(differences, 0.0)
    interval = test.confidence_interval(0.95)
    return {**out, "low": back(float(interval.low) + offset), "high": back(float(interval.high) + offset), "p": float(test.pvalue),
            "verdict": verdict(float(interval.low), float(interval.high), 0.0, better)}


def confirmed_figures(picks: list[dict], method: str, baseline: str | None) -> dict:
    """One method's confirmed picks (`picks`: rows of `method`, `seed`, `gain` and `fid_ratio` as
    {value, low, high}, `passed`): per seed, and over seeds against the base and, seed by seed,
    against `baseline`'s picks (none: not compared)."""
    mine = {p["seed"]: p for p in picks if p["method"] == method}
    seeds = sorted(mine)
    out = {"seeds": seeds, "per_seed": [mine[s] for s in seeds],
           "gain_vs_base": over_seeds([mine[s]["gain"]["value"] for s in seeds], 0.0, "greater"),
           "fid_ratio_vs_base": over_seeds([mine[s]["fid_ratio"]["value"] for s in seeds], 1.0, "less", log=True),
           "confirmed_champions": sum(bool(mine[s]["passed"]) for s in seeds)}
    theirs = {p["seed"]: p for p in picks if p["method"] == baseline}
    common = [s for s in seeds if s in theirs]
    if baseline and method != baseline and common:
        out["gain_vs_baseline"] = over_seeds([mine[s]["gain"]["value"] for s in common], 0.0, "greater",
                                             paired_with=[theirs[s]["gain"]["value"] for s in common])
        out["fid_ratio_vs_baseline"] = over_seeds([mine[s]["fid_ratio"]["value"] for s in common], 1.0, "less", log=True,
                                                  paired_with=[theirs[s]["fid_ratio"]["value"] for s in common])
    return out


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict], base: dict, fid_tolerance: float, trained_lower_better: bool = False,
              picks: list[dict] | None = None, baseline: str | None = None) -> dict[str, dict]:
    """Per method: the figures above, over its seeds, the checkpoints the hacking flag fired on, and
    (with `picks`) its confirmed picks against the base and against `baseline`."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seeds = sorted({r["seed"] for r in mine})
        volumes, gaps, best_fids, best_within = [], [], [], []
        for seed in seeds:
            seeded = [r for r in mine if r["seed"] == seed]
            volumes.append(hypervolume(pareto_front(seeded), base))
            gaps.append(max(reward_gap(r, base, lower_better={"trained_quality": trained_lower_better}) for r in seeded))
            best_fids.append(min(r["fid"] for r in seeded))
            within = [r["heldout_quality"] for r in seeded if r["fid"] <= base["fid"] * (1 + fid_tolerance)]
            if within:
                best_within.append(max(within))
        flags = [hacked(r, fid_tolerance, trained_lower_better) for r in mine]
        flagged = [r for r, flag in zip(mine, flags) if flag]
        summary[method] = {
            "seeds": seeds,
            "checkpoints": len(mine),
            "hypervolume": _spread(volumes),
            "best_fid": _spread(best_fids),
            "best_heldout_within_tolerance": _spread(best_within),
            "seeds_with_a_point_within_tolerance": len(best_within),
            "reward_gap": _spread(gaps),
            "hacking": [{k: r[k] for k in ("seed", "trial", "step", "fid", "heldout_quality", "trained_quality")} for r in flagged],
            "hacking_unchecked": sum(flag is None for flag in flags),  # no paired intervals: not judged
        }
        if picks and any(p["method"] == method for p in picks):
            summary[method]["confirmed"] = confirmed_figures(picks, method, baseline)
    return summary


def _pm(pair: tuple[float, float], digits: int = 3) -> str:
    mean, std = pair
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: dict[str, dict], base: dict, noise: dict | None = None) -> str:
    lines = [f"base model: FID {base['fid']:.2f}, held-out quality {base['heldout_quality']:.4f}, trained quality {base['trained_quality']:.4f}"]
    if noise:
        lines.append(f"evaluation noise (standard deviation over sampling seeds, the base model): FID {noise['fid']:.2f}, "
                     f"held-out {noise['heldout_quality']:.4f}, trained {noise['trained_quality']:.4f}")
    lines += ["",
             "| method | seeds | checkpoints | hypervolume | best FID | best held-out within tolerance | reward gap (max) | reward hacking |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for method, s in summary.items():
        flag = f"**yes**: {len(s['hacking'])} of {s['checkpoints']} checkpoints" if s["hacking"] else "no"
        if s.get("hacking_unchecked"):
            flag += f" ({s['hacking_unchecked']} without per-sample data, not judged)"
        within = _pm(s["best_heldout_within_tolerance"], 4) + (f" ({s['seeds_with_a_point_within_tolerance']} of {len(s['seeds'])} seeds)"
                                                               if s["seeds_with_a_point_within_tolerance"] < len(s["seeds"]) else "")
        lines.append(f"| {method} | {len(s['seeds'])} | {s['checkpoints']} | {_pm(s['hypervolume'], 4)} | {_pm(s['best_fid'], 1)} | {within} | "
                     f"{_pm(s['reward_gap'], 4)} | {flag} |")
    return "\n".join(lines) + "\n"


def _ci(figure: dict, digits: int = 4, signed: bool = True) -> str:
    if not math.isfinite(figure["mean"]):
        return "n/a"
    text = f"{figure['mean']:+.{digits}f}" if signed else f"{figure['mean']:.{digits}f}"
    if not math.isfinite(figure["low"]):
        return text
    return f"{text} [{figure['low']:.{digits}f}, {figure['high']:.{digits}f}]"


def _cell(figure: dict | None, digits: int = 4, signed: bool = True) -> str:
    if figure is None:
        return ""
    label = figure["verdict"]
    return f"{_ci(figure, digits, signed)} {'**' + label + '**' if label in ('better', 'worse') else label}"


def confirmed_table(summary: dict[str, dict], banks: list[dict] | None = None) -> str:
    """The confirmed picks: per method, over seeds, against the base and against the baseline's picks."""
    confirmed = {m: s["confirmed"] for m, s in summary.items() if "confirmed" in s}
    if not confirmed:
        return ""
    where = ""
    if banks:
        where = (f" (seed bank{'s' if len(banks) > 1 else ''} {', '.join(str(b['seed']) for b in banks)}, one per study seed and shared by its methods; "
                 f"{banks[0]['samples']} samples, each pick paired with the base on its bank)")
    lines = [f"Each sweep's pick (the head of its screening order) re-measured on samples the search never saw{where}. Over seeds: "
             "the mean (for FID ratios the geometric mean), its 95% t-interval, and the verdict, *within noise* where the "
             "interval holds no change; against the baseline, seed by seed:", "",
             "| method | seeds | confirmed champions | held-out gain over the base | FID ratio to the base | gain minus the baseline's | FID ratio to the baseline's |",
             "|---|---:|---:|---|---|---|---|"]
    for method, c in confirmed.items():
        lines.append(f"| {method} | {len(c['seeds'])} | {c['confirmed_champions']} of {len(c['seeds'])} | {_cell(c['gain_vs_base'])} | "
                     f"{_cell(c['fid_ratio_vs_base'], 3, signed=False)} | {_cell(c.get('gain_vs_baseline'))} | "
                     f"{_cell(c.get('fid_ratio_vs_baseline'), 3, signed=False)} |")
    lines += ["", "Per seed (the pick, its confirmed held-out gain and FID ratio with the 95% paired-bootstrap interval):", ""]
    for method, c in confirmed.items():
        for pick in c["per_seed"]:
            g, r = pick["gain"], pick["fid_ratio"]
            lines.append(f"- {method}, seed {pick['seed']}: trial {pick['trial']} step {pick['step']}: gain {g['value']:+.4f} "
                         f"[{g['low']:+.4f}, {g['high']:+.4f}], FID ratio {r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"
                         f"{' (confirmed champion)' if pick['passed'] else ''}")
    return "\n".join(lines) + "\n"


def plot_fronts(rows: list[dict], base: dict, path, zoom: float = 1.5) -> None:
    """Every method's Pareto front (each seed's front, one colour per method) on one FID / held-out
    quality plot, every evaluated checkpoint faint behind, the base model marked: left every
    checkpoint, right the region near the base model (FID up to `zoom` times the base's), where the
    methods that kept fidelity are told apart (a hacked method's FID can be 50 times the base's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sweeps.front_plots import save_front_plot

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes:
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            color = colors[i % len(colors)]
            mine = [r for r in rows if r["method"] == method]
            ax.scatter([r["fid"] for r in mine], [r["heldout_quality"] for r in mine], s=10, color=color, alpha=0.25)
            for j, seed in enumerate(sorted({r["seed"] for r in mine})):
                front = pareto_front([r for r in mine if r["seed"] == seed])
                ax.plot([r["fid"] for r in front], [r["heldout_quality"] for r in front], "o-", color=color, ms=4, lw=1.2,
                        label=method if j == 0 else None)
        ax.scatter([base["fid"]], [base["heldout_quality"]], marker="*", s=200, c="black", label="base model", zorder=5)
    near = [r for r in rows if r["fid"] <= base["fid"] * zoom] + [base]
    low, high = min(r["heldout_quality"] for r in near), max(r["heldout_quality"] for r in near)
    pad = 0.05 * (high - low) or 0.01
    axes[1].set_xlim(0.95 * min(r["fid"] for r in near), base["fid"] * zoom)
    axes[1].set_ylim(low - pad, high + pad)
    axes[0].set_title("every evaluated checkpoint", fontsize=10)
    axes[1].set_title(f"near the base model (FID up to {zoom:g}x the base's)", fontsize=10)
    axes[0].set_xlabel("FID (lower is better)")
    axes[0].set_ylabel("held-out quality (higher is better)")
    save_front_plot(fig, axes[1], path)
