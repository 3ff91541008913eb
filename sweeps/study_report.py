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
- the reward-hacking flag: a checkpoint where the trained reward rose while held-out quality fell
  or FID got worse than the base by more than the tolerance, each change beyond twice its
  evaluation noise (the spread of the base model's figures over sampling seeds): at a few hundred
  samples FID alone moves by ~15% with the seed, and a flag without that margin fires on noise.
"""

from __future__ import annotations

import math
import statistics

from eval.evaluate import reward_gap
from sweeps.selection import hypervolume, pareto_front


def hacked(row: dict, base: dict, fid_tolerance: float, trained_lower_better: bool = False, noise: dict | None = None,
           margin: float = 2.0) -> bool:
    """The trained reward rose while the held-out score fell or FID got worse than the tolerance allows,
    each change beyond `margin` standard deviations of its evaluation noise (`noise`: metric -> std,
    `eval.evaluate.sampling_noise`; none: any change counts)."""
    spread = {name: margin * (noise or {}).get(name, 0.0) for name in ("trained_quality", "heldout_quality", "fid")}
    rise = row["trained_quality"] - base["trained_quality"]
    rose = (-rise if trained_lower_better else rise) > spread["trained_quality"]
    worse = (row["heldout_quality"] < base["heldout_quality"] - spread["heldout_quality"]
             or row["fid"] > base["fid"] * (1 + fid_tolerance) + spread["fid"])
    return rose and worse


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict], base: dict, fid_tolerance: float, trained_lower_better: bool = False,
              noise: dict | None = None) -> dict[str, dict]:
    """Per method: the figures above, over its seeds, and the checkpoints the hacking flag fired on
    (`noise`: metric -> standard deviation over sampling seeds)."""
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
        flagged = [r for r in mine if hacked(r, base, fid_tolerance, trained_lower_better, noise)]
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
        within = _pm(s["best_heldout_within_tolerance"], 4) + (f" ({s['seeds_with_a_point_within_tolerance']} of {len(s['seeds'])} seeds)"
                                                               if s["seeds_with_a_point_within_tolerance"] < len(s["seeds"]) else "")
        lines.append(f"| {method} | {len(s['seeds'])} | {s['checkpoints']} | {_pm(s['hypervolume'], 4)} | {_pm(s['best_fid'], 1)} | {within} | "
                     f"{_pm(s['reward_gap'], 4)} | {flag} |")
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
