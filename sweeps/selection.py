"""Selection of the champion: pure functions over a table of evaluated checkpoints.

A row is a dict with at least `fid` (lower is better) and `heldout_quality` (higher is better: the
quality model the objective never sees); the sweep adds `trial`, `step`, `checkpoint` and the
trial's parameters. The base model's row is the
reference point: of the front, of the hypervolume, and of the fidelity tolerance.
"""

from __future__ import annotations

import math


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b on both objectives and better on one."""
    return a["fid"] <= b["fid"] and a["heldout_quality"] >= b["heldout_quality"] and (a["fid"] < b["fid"] or a["heldout_quality"] > b["heldout_quality"])


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row dominates, sorted by FID. Exact ties are all kept (neither dominates)."""
    finite = [r for r in rows if math.isfinite(r["fid"]) and math.isfinite(r["heldout_quality"])]
    front = [r for r in finite if not any(dominates(other, r) for other in finite)]
    return sorted(front, key=lambda r: (r["fid"], -r["heldout_quality"]))


def hypervolume(front: list[dict], reference: dict) -> float:
    """Area dominated by the front and bounded by the reference point (the base model): how much
    better than the base, in (FID drop) x (held-out quality gain) units. Points not better than the
    reference in both objectives add nothing."""
    points = sorted({(r["fid"], r["heldout_quality"]) for r in front if r["fid"] < reference["fid"] and r["heldout_quality"] > reference["heldout_quality"]})
    area, best_quality = 0.0, reference["heldout_quality"]
    # from the best FID to the reference's: each FID interval is covered up to the best held-out quality
    # reached by any point at or below it
    for (fid, heldout_quality), next_fid in zip(points, [p[0] for p in points[1:]] + [reference["fid"]]):
        best_quality = max(best_quality, heldout_quality)
        area += (next_fid - fid) * (best_quality - reference["heldout_quality"])
    return area


def knee(front: list[dict]) -> dict:
    """The knee of the front, both objectives normalized to [0, 1]: the point farthest from the line
    through the two extremes. Two points normalize to the two corners, equally far from the ideal:
    then the one with the lower FID (fidelity first)."""
    if len(front) <= 2:
        return min(front, key=lambda r: (r["fid"], -r["heldout_quality"]))
    fids, qualities = [r["fid"] for r in front], [r["heldout_quality"] for r in front]
    span_f, span_a = (max(fids) - min(fids)) or 1.0, (max(qualities) - min(qualities)) or 1.0

    def normalized(r):  # 0 is best on both axes
        return (r["fid"] - min(fids)) / span_f, (max(qualities) - r["heldout_quality"]) / span_a

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
    limit = base["fid"] * (1 + fid_tolerance)
    within = [r for r in front if r["fid"] <= limit]
    if within:
        return max(within, key=lambda r: (r["heldout_quality"], -r["fid"])), f"highest held-out quality with FID <= {limit:.4g} (base {base['fid']:.4g} + {fid_tolerance:.0%})"
    return knee(front), f"knee of the front (no point has FID <= {limit:.4g})"


def params_text(row: dict, separator: str = ", ", equals: str = "=") -> str:
    """A row's searched parameters (`param:KEY` entries) as text, floats to 4 significant digits."""
    return separator.join(f"{k[6:]}{equals}{v:.4g}" if isinstance(v, float) else f"{k[6:]}{equals}{v}"
                          for k, v in row.items() if k.startswith("param:"))
