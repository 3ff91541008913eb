"""Selection of the champion: pure functions over a table of evaluated checkpoints.

A row is a dict with at least the front's two axes (`eval.evaluate.FRONT_AXES`): `fid` (lower is
better) and `heldout_quality` (higher is better: the quality model the objective never sees); the
sweep adds `trial`, `step`, `checkpoint` and the trial's parameters. The base model's row is the
reference point: of the front, of the hypervolume, and of the fidelity tolerance.
"""

from __future__ import annotations

import math

from eval.axes import FRONT_AXES

FIDELITY, QUALITY = FRONT_AXES  # the axis to lower (the fidelity tolerance is on it), the axis to raise
if (FRONT_AXES[FIDELITY], FRONT_AXES[QUALITY]) != ("min", "max"):
    raise ImportError(f"sweeps/selection.py expects the front's axes as (min, max), got {FRONT_AXES}")


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b on both objectives and better on one."""
    return a[FIDELITY] <= b[FIDELITY] and a[QUALITY] >= b[QUALITY] and (a[FIDELITY] < b[FIDELITY] or a[QUALITY] > b[QUALITY])


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row dominates, sorted by FID. Exact ties are all kept (neither dominates)."""
    finite = [r for r in rows if math.isfinite(r[FIDELITY]) and math.isfinite(r[QUALITY])]
    front = [r for r in finite if not any(dominates(other, r) for other in finite)]
    return sorted(front, key=lambda r: (r[FIDELITY], -r[QUALITY]))


def hypervolume(front: list[dict], reference: dict) -> float:
    """Area dominated by the front and bounded by the reference point (the base model): how much
    better than the base, in (FID drop) x (held-out quality gain) units. Points not better than the
    reference in both objectives add nothing."""
    points = sorted({(r[FIDELITY], r[QUALITY]) for r in front if r[FIDELITY] < reference[FIDELITY] and r[QUALITY] > reference[QUALITY]})
    area, best_quality = 0.0, reference[QUALITY]
    # from the best FID to the reference's: each FID interval is covered up to the best held-out quality
    # reached by any point at or below it
    for (fid, heldout_quality), next_fid in zip(points, [p[0] for p in points[1:]] + [reference[FIDELITY]]):
        best_quality = max(best_quality, heldout_quality)
        area += (next_fid - fid) * (best_quality - reference[QUALITY])
    return area


def knee(front: list[dict]) -> dict:
    """The knee of the front, both objectives normalized to [0, 1]: the point farthest from the line
    through the two extremes. Two points normalize to the two corners, equally far from the ideal:
    then the one with the lower FID (fidelity first)."""
    if len(front) <= 2:
        return min(front, key=lambda r: (r[FIDELITY], -r[QUALITY]))
    fids, qualities = [r[FIDELITY] for r in front], [r[QUALITY] for r in front]
    span_f, span_a = (max(fids) - min(fids)) or 1.0, (max(qualities) - min(qualities)) or 1.0

    def normalized(r):  # 0 is best on both axes
        return (r[FIDELITY] - min(fids)) / span_f, (max(qualities) - r[QUALITY]) / span_a

    (x1, y1), (x2, y2) = normalized(front[0]), normalized(front[-1])
    length = math.hypot(x2 - x1, y2 - y1) or 1.0

    def distance(r):
        x, y = normalized(r)
        return abs((y2 - y1) * x - (x2 - x1) * y + x2 * y1 - y2 * x1) / length

    return max(front, key=distance)


def select_champion(rows: list[dict], base: dict, fid_tolerance: float) -> tuple[dict | None, str]:
    """The champion and the rule that chose it: the highest held-out quality among front points whose FID is
    within `fid_tolerance` (relative) of the base model's; otherwise the knee of the front."""
    front = pareto_front(rows)
    if not front:
        return None, "no finite results"
    limit = base[FIDELITY] * (1 + fid_tolerance)
    within = [r for r in front if r[FIDELITY] <= limit]
    if within:
        return max(within, key=lambda r: (r[QUALITY], -r[FIDELITY])), f"highest held-out quality with FID <= {limit:.4g} (base {base[FIDELITY]:.4g} + {fid_tolerance:.0%})"
    return knee(front), f"knee of the front (no point has FID <= {limit:.4g})"


def params_text(row: dict, separator: str = ", ", equals: str = "=") -> str:
    """A row's searched parameters (`param:KEY` entries) as text, floats to 4 significant digits."""
    return separator.join(f"{k[6:]}{equals}{v:.4g}" if isinstance(v, float) else f"{k[6:]}{equals}{v}"
                          for k, v in row.items() if k.startswith("param:"))


ALPHA = 0.05  # the confidence rule's level: 95%


def screening_order(front: list[dict], base: dict, fid_tolerance: float) -> list[dict]:
    """The front in the order the screening figures prefer it: points within the FID tolerance by
    held-out quality (best first), then the rest by FID. The confirmation re-measures its head."""
    limit = base[FIDELITY] * (1 + fid_tolerance)
    within = sorted((r for r in front if r[FIDELITY] <= limit), key=lambda r: (-r[QUALITY], r[FIDELITY]))
    return within + sorted((r for r in front if r[FIDELITY] > limit), key=lambda r: (r[FIDELITY], -r[QUALITY]))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (scipy has Benjamini-Hochberg's, not
    Holm's): the i-th smallest times (k - i), made monotone. A hypothesis is rejected where its
    adjusted p-value is <= alpha; the chance of any false rejection among the k stays <= alpha."""
    k = len(p_values)
    adjusted, running = [0.0] * k, 0.0
    for rank, i in enumerate(sorted(range(k), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (k - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def confident_champion(candidates: list[dict], alpha: float = ALPHA) -> tuple[dict | None, str, list[float]]:
    """The champion of the confirmation: each candidate carries `p_gain` (the bootstrap p-value of "no
    held-out gain over the base") and `p_fidelity` (of "FID ratio beyond the tolerance"), both on the
    confirmation bank, and `gain_low` (the 95% lower bound on its held-out gain). A candidate passes
    when both nulls are rejected (p = the larger of the two: an intersection-union test), Holm-adjusted
    over the k candidates; the champion is the passing one with the highest lower bound on the gain.
    Returns (champion or None, the rule in words, the adjusted p-values)."""
    if not candidates:
        return None, "no candidate to confirm", []
    adjusted = holm([max(c["p_gain"], c["p_fidelity"]) for c in candidates])
    passing = [c for c, p in zip(candidates, adjusted) if p <= alpha]
    what = (f"the highest 95% lower bound on held-out gain among the {len(candidates)} confirmed candidates whose gain > 0 "
            f"and FID-ratio bound within the tolerance hold at {1 - alpha:.0%} confidence (Holm over {len(candidates)})")
    if not passing:
        return None, f"no checkpoint beat the base model with {1 - alpha:.0%} confidence ({what})", adjusted
    return max(passing, key=lambda c: c["gain_low"]), what, adjusted
