"""The report of a study (several methods, each swept under the same budget and seeds): pure
functions over the per-checkpoint table, then the files (Markdown, a self-contained HTML page, PNGs).

A row of the table is one evaluated checkpoint: `method`, `seed`, `trial`, `step`, `fid`,
`heldout_quality`, `trained_quality` (and whatever else the checkpoint's metrics hold). `base` is
the base model's row. Every figure of the report is computed here from those rows, so a test can
recompute it from the same table:

- hypervolume of each (method, seed)'s front against the base point (`sweeps.selection`), mean and
  spread over seeds;
- best FID, and best held-out quality among checkpoints within the FID tolerance;
- the reward gap of a checkpoint: the trained reward's gain minus the held-out score's gain, each
  relative to its base value (`(r - r_base) / |r_base|`, signs turned so a gain is positive): large
  when the optimised reward rises and the held-out judge does not. Per seed the largest gap over
  the method's checkpoints, then mean and spread over seeds;
- the reward-hacking flag: a checkpoint where the trained reward rose while held-out quality fell
  or FID got worse than the base by more than the tolerance.
"""

from __future__ import annotations

import math
import statistics

from sweeps.selection import hypervolume, pareto_front


def relative_gain(value: float, base: float, lower_better: bool = False) -> float:
    """(value - base) / |base|, positive when `value` is better than `base`."""
    gain = (value - base) / (abs(base) or 1.0)
    return -gain if lower_better else gain


def reward_gap(row: dict, base: dict, trained_lower_better: bool = False, heldout_lower_better: bool = False) -> float:
    return (relative_gain(row["trained_quality"], base["trained_quality"], trained_lower_better)
            - relative_gain(row["heldout_quality"], base["heldout_quality"], heldout_lower_better))


def hacked(row: dict, base: dict, fid_tolerance: float, trained_lower_better: bool = False) -> bool:
    """The trained reward rose while the held-out score fell or FID got worse than the tolerance allows."""
    rose = relative_gain(row["trained_quality"], base["trained_quality"], trained_lower_better) > 0
    worse = row["heldout_quality"] < base["heldout_quality"] or row["fid"] > base["fid"] * (1 + fid_tolerance)
    return rose and worse


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict], base: dict, fid_tolerance: float, trained_lower_better: bool = False) -> dict[str, dict]:
    """Per method: the figures above, over its seeds, and the checkpoints the hacking flag fired on."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seeds = sorted({r["seed"] for r in mine})
        volumes, gaps, best_fids, best_within = [], [], [], []
        for seed in seeds:
            seeded = [r for r in mine if r["seed"] == seed]
            volumes.append(hypervolume(pareto_front(seeded), base))
            gaps.append(max(reward_gap(r, base, trained_lower_better) for r in seeded))
            best_fids.append(min(r["fid"] for r in seeded))
            within = [r["heldout_quality"] for r in seeded if r["fid"] <= base["fid"] * (1 + fid_tolerance)]
            if within:
                best_within.append(max(within))
        flagged = [r for r in mine if hacked(r, base, fid_tolerance, trained_lower_better)]
        summary[method] = {
            "seeds": seeds,
            "checkpoints": len(mine),
            "hypervolume": _spread(volumes),
            "best_fid": _spread(best_fids),
            "best_heldout_within_tolerance": _spread(best_within),
            "seeds_with_a_point_within_tolerance": len(best_within),
            "reward_gap": _spread(gaps),
            "hacking": [{k: r[k] for k in ("seed", "trial", "step", "fid", "heldout_quality", "trained_quality")} for r in flagged],
        }
    return summary


def _pm(pair: tuple[float, float], digits: int = 3) -> str:
    mean, std = pair
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: dict[str, dict], base: dict) -> str:
    lines = [f"base model: FID {base['fid']:.2f}, held-out quality {base['heldout_quality']:.4f}, trained quality {base['trained_quality']:.4f}",
             "",
             "| method | seeds | hypervolume | best FID | best held-out within tolerance | reward gap (max) | reward hacking |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for method, s in summary.items():
        flag = f"**yes**: {len(s['hacking'])} of {s['checkpoints']} checkpoints" if s["hacking"] else "no"
        within = _pm(s["best_heldout_within_tolerance"], 4) + (f" ({s['seeds_with_a_point_within_tolerance']} of {len(s['seeds'])} seeds)"
                                                               if s["seeds_with_a_point_within_tolerance"] < len(s["seeds"]) else "")
        lines.append(f"| {method} | {len(s['seeds'])} | {_pm(s['hypervolume'], 4)} | {_pm(s['best_fid'], 1)} | {within} | "
                     f"{_pm(s['reward_gap'], 4)} | {flag} |")
    return "\n".join(lines) + "\n"


def plot_fronts(rows: list[dict], base: dict, path) -> None:
    """Every method's Pareto front (each seed's front, one colour per method) on one FID / held-out
    quality plot, every evaluated checkpoint faint behind, the base model marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sweeps.acpo_sweep import save_front_plot

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        color = colors[i % len(colors)]
        mine = [r for r in rows if r["method"] == method]
        ax.scatter([r["fid"] for r in mine], [r["heldout_quality"] for r in mine], s=10, color=color, alpha=0.25)
        for j, seed in enumerate(sorted({r["seed"] for r in mine})):
            front = pareto_front([r for r in mine if r["seed"] == seed])
            ax.plot([r["fid"] for r in front], [r["heldout_quality"] for r in front], "o-", color=color, ms=4, lw=1.2,
                    label=method if j == 0 else None)
    ax.scatter([base["fid"]], [base["heldout_quality"]], marker="*", s=200, c="black", label="base model", zorder=5)
    save_front_plot(fig, ax, path)
