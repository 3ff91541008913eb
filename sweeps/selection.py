"""Selection of the champion: pure functions over a table of evaluated checkpoints.

A row is a dict with at least the front's two axes (`eval.axes.front_axes`): a fidelity figure, `fid`
or `kid` (lower is better; which one is `sweep.fidelity`, the functions' `axis`), and
`heldout_quality` (higher is better: the quality model the objective never sees); the sweep adds
`trial`, `step`, `checkpoint` and the trial's parameters. The base model's row is the reference
point: of the front, of the hypervolume, and of the fidelity tolerance (`Fidelity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eval.axes import FIDELITY_AXES, QUALITY_AXIS

QUALITY = QUALITY_AXIS  # the axis to raise
FIDELITY = "fid"  # the default axis to lower


@dataclass(frozen=True)
class Fidelity:
    """The front's fidelity axis and the champion rule's tolerance on it, in one place.

    FID's tolerance is relative, FID <= base's x (1 + tolerance): FID's level falls with the sample
    count (its bias), and a ratio of two figures on one bank cancels much of it. KID's is absolute,
    KID <= base's + tolerance: KID is unbiased, so a base's KID can lie near 0 or below it, where a
    ratio means nothing. The confirmation bounds the paired figure (`paired`: `fid_ratio`, `kid_diff`)
    by `paired_limit`."""

    axis: str = "fid"
    tolerance: float = 0.1

    def __post_init__(self):
        if self.axis not in FIDELITY_AXES:
            raise ValueError(f"the fidelity axis is one of {', '.join(FIDELITY_AXES)}, not {self.axis!r}")

    @classmethod
    def of(cls, sweep) -> "Fidelity":
        """A sweep's (`sweeps.presets.SweepConfig`: `fidelity`, `fid_tolerance`, `kid_tolerance`)."""
        return cls(sweep.fidelity, sweep.fid_tolerance if sweep.fidelity == "fid" else sweep.kid_tolerance)

    @classmethod
    def from_json(cls, data: dict | None, fid_tolerance: float = 0.1) -> "Fidelity":
        """From a selection's record (`to_json`); a selection written before the axis was a choice: FID."""
        return cls(data["axis"], data["tolerance"]) if data else cls("fid", fid_tolerance)

    def to_json(self) -> dict:
        return {"axis": self.axis, "tolerance": self.tolerance, "kind": "relative" if self.relative else "absolute"}

    @property
    def relative(self) -> bool:
        return self.axis == "fid"

    @property
    def label(self) -> str:
        return self.axis.upper()

    @property
    def paired(self) -> str:
        """The paired figure of a checkpoint against the base on one bank (eval/intervals.py)."""
        return "fid_ratio" if self.relative else "kid_diff"

    @property
    def paired_label(self) -> str:
        return "FID ratio" if self.relative else "KID difference"

    @property
    def paired_limit(self) -> float:
        """The largest `paired` value the tolerance allows."""
        return 1 + self.tolerance if self.relative else self.tolerance

    def paired_value(self, row: dict, base: dict) -> float:
        """`paired` from two point figures: the checkpoint's ratio to (or difference from) the base's."""
        return row[self.axis] / base[self.axis] if self.relative else row[self.axis] - base[self.axis]

    def limit(self, base: dict) -> float:
        """The largest figure on this axis the tolerance allows, given the base's row."""
        return base[self.axis] * (1 + self.tolerance) if self.relative else base[self.axis] + self.tolerance

    def limit_text(self, base: dict) -> str:
        added = f"{self.tolerance:.0%}" if self.relative else f"{self.tolerance:.4g}"
        return f"{self.label} <= {self.limit(base):.4g} (base {base[self.axis]:.4g} + {added})"


def dominates(a: dict, b: dict, axis: str = FIDELITY) -> bool:
    """a is at least as good as b on both objectives and better on one (`axis`: the fidelity axis)."""
    return a[axis] <= b[axis] and a[QUALITY] >= b[QUALITY] and (a[axis] < b[axis] or a[QUALITY] > b[QUALITY])


def pareto_front(rows: list[dict], axis: str = FIDELITY) -> list[dict]:
    """Rows no other row dominates, sorted by the fidelity figure. Exact ties are all kept (neither dominates)."""
    finite = [r for r in rows if math.isfinite(r[axis]) and math.isfinite(r[QUALITY])]
    front = [r for r in finite if not any(dominates(other, r, axis) for other in finite)]
    return sorted(front, key=lambda r: (r[axis], -r[QUALITY]))


def hypervolume(front: list[dict], reference: dict, axis: str = FIDELITY) -> float:
    """Area dominated by the front and bounded by the reference point (the base model): how much
    better than the base, in (fidelity drop) x (held-out quality gain) units. Points not better than
    the reference in both objectives add nothing."""
    points = sorted({(r[axis], r[QUALITY]) for r in front if r[axis] < reference[axis] and r[QUALITY] > reference[QUALITY]})
    area, best_quality = 0.0, reference[QUALITY]
    # from the best fidelity figure to the reference's: each interval is covered up to the best held-out
    # quality reached by any point at or below it
    for (fidelity, heldout_quality), next_fidelity in zip(points, [p[0] for p in points[1:]] + [reference[axis]]):
        best_quality = max(best_quality, heldout_quality)
        area += (next_fidelity - fidelity) * (best_quality - reference[QUALITY])
    return area


def knee(front: list[dict], axis: str = FIDELITY) -> dict:
    """The knee of the front, both objectives normalized to [0, 1]: the point farthest from the line
    through the two extremes. Two points normalize to the two corners, equally far from the ideal:
    then the one with the better fidelity figure (fidelity first)."""
    if len(front) <= 2:
        return min(front, key=lambda r: (r[axis], -r[QUALITY]))
    fidelities, qualities = [r[axis] for r in front], [r[QUALITY] for r in front]
    span_f, span_a = (max(fidelities) - min(fidelities)) or 1.0, (max(qualities) - min(qualities)) or 1.0

    def normalized(r):  # 0 is best on both axes
        return (r[axis] - min(fidelities)) / span_f, (max(qualities) - r[QUALITY]) / span_a

    (x1, y1), (x2, y2) = normalized(front[0]), normalized(front[-1])
    length = math.hypot(x2 - x1, y2 - y1) or 1.0

    def distance(r):
        x, y = normalized(r)
        return abs((y2 - y1) * x - (x2 - x1) * y + x2 * y1 - y2 * x1) / length

    return max(front, key=distance)


def select_champion(rows: list[dict], base: dict, fidelity: Fidelity) -> tuple[dict | None, str]:
    """The champion of the screening figures and the rule that chose it: the highest held-out quality
    among front points within the fidelity tolerance of the base model's; otherwise the knee of the front."""
    front = pareto_front(rows, fidelity.axis)
    if not front:
        return None, "no finite results"
    limit = fidelity.limit(base)
    within = [r for r in front if r[fidelity.axis] <= limit]
    if within:
        return max(within, key=lambda r: (r[QUALITY], -r[fidelity.axis])), f"highest held-out quality with {fidelity.limit_text(base)}"
    return knee(front, fidelity.axis), f"knee of the front (no point has {fidelity.label} <= {limit:.4g})"


def params_text(row: dict, separator: str = ", ", equals: str = "=") -> str:
    """A row's searched parameters (`param:KEY` entries) as text, floats to 4 significant digits."""
    return separator.join(f"{k[6:]}{equals}{v:.4g}" if isinstance(v, float) else f"{k[6:]}{equals}{v}"
                          for k, v in row.items() if k.startswith("param:"))


ALPHA = 0.05  # the confidence rule's level: 95%


def screening_order(front: list[dict], base: dict, fidelity: Fidelity) -> list[dict]:
    """The front in the order the screening figures prefer it: points within the fidelity tolerance by
    held-out quality (best first), then the rest by the fidelity figure. The confirmation re-measures its head."""
    axis, limit = fidelity.axis, fidelity.limit(base)
    within = sorted((r for r in front if r[axis] <= limit), key=lambda r: (-r[QUALITY], r[axis]))
    return within + sorted((r for r in front if r[axis] > limit), key=lambda r: (r[axis], -r[QUALITY]))


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


def confident_champion(candidates: list[dict], alpha: float = ALPHA, fidelity: Fidelity = Fidelity()) -> tuple[dict | None, str, list[float]]:
    """The champion of the confirmation: each candidate carries `p_gain` (the bootstrap p-value of "no
    held-out gain over the base") and `p_fidelity` (of "the fidelity figure beyond the tolerance": FID
    ratio or KID difference, `fidelity.paired`), both on the
    confirmation bank, and `gain_low` (the 95% lower bound on its held-out gain). A candidate passes
    when both nulls are rejected (p = the larger of the two: an intersection-union test), Holm-adjusted
    over the k candidates; the champion is the passing one with the highest lower bound on the gain.
    Returns (champion or None, the rule in words, the adjusted p-values)."""
    if not candidates:
        return None, "no candidate to confirm", []
    adjusted = holm([max(c["p_gain"], c["p_fidelity"]) for c in candidates])
    passing = [c for c, p in zip(candidates, adjusted) if p <= alpha]
    what = (f"the highest 95% lower bound on held-out gain among the {len(candidates)} confirmed candidates whose gain > 0 "
            f"and {fidelity.paired_label} bound within the tolerance hold at {1 - alpha:.0%} confidence (Holm over {len(candidates)})")
    if not passing:
        return None, f"no checkpoint beat the base model with {1 - alpha:.0%} confidence ({what})", adjusted
    return max(passing, key=lambda c: c["gain_low"]), what, adjusted
