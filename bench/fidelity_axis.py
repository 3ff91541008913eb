"""Which fidelity figure resolves more at equal cost: FID or KID. From the per-sample data a study (or
a sweep) already stored, nothing sampled again: every checkpoint paired with the base on the same
seed bank, the 95% paired-bootstrap interval (eval/intervals.py) of its FID ratio and of its KID
difference, both relative to the base's figure (the scale of the champion rule's tolerance, 10% of
the base's), at each sample count the folder holds (the screening's and the confirmation's). Side
by side in one run, medians over the checkpoints.

    .venv/bin/python bench/fidelity_axis.py runs/studies/<study>            # a study's folder (or a sweep's)
    .venv/bin/python bench/fidelity_axis.py runs/studies/<study> --limit 6 --resamples 200

Read: `kid / fid` below 1 would make KID the better axis at that sample count (a narrower interval
for the same images); above 1, FID. "decided": the share of checkpoints whose interval lies wholly
on one side of the 10% tolerance, the question the rule asks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 0.1


def pairs(folder: Path) -> dict[str, list[tuple[Path, Path]]]:
    """(checkpoint, base) per-sample files on one bank, grouped by bank: the screening's (each
    checkpoint's `per_sample.safetensors` against the folder's `base_per_sample.safetensors`, in a
    study the base shared by its sweeps) and each confirmation folder's (its candidates against its `base.safetensors`)."""
    from trainers.common import layout

    out: dict[str, list[tuple[Path, Path]]] = {}
    base = folder / layout.BASE_PER_SAMPLE
    if base.is_file():
        out["screening"] = [(p, base) for p in sorted(folder.glob(f"**/{layout.CHECKPOINT_PER_SAMPLE}"))]
    for bank_base in sorted(folder.glob(f"**/{layout.CONFIRMATION}/*/base.safetensors")):
        candidates = [p for p in sorted(bank_base.parent.glob("*.safetensors")) if p.name != "base.safetensors"]
        out.setdefault(f"confirmation {bank_base.parent.name.split('-steps')[0]}", []).extend((p, bank_base) for p in candidates)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--preset", default="", help="whose reference set (eval.reference) the figures are against "
                        "(default: a study folder's own, from its study.json; else digits)")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--limit", type=int, default=0, help="at most this many checkpoints per bank (0: all)")
    args = parser.parse_args(argv)

    import json

    from eval.evaluate import Evaluator
    from eval.intervals import paired_intervals
    from sweeps.confirm import read_per_sample
    from sweeps.presets import load

    study_file = args.folder / "study.json"
    preset = args.preset or (json.loads(study_file.read_text())["preset"] if study_file.is_file() else "digits")
    config, _ = load(preset, [])
    reference = Evaluator.from_config(config, quality=False).reference_features()
    groups = pairs(args.folder)
    if not groups:
        print(f"{args.folder}: no per-sample data paired with a base (a study's or a sweep's folder)", file=sys.stderr)
        return 2
    print(f"reference: {len(reference)} images ({config.eval.reference}); {args.resamples} bootstrap resamples; "
          f"half-widths relative to the base's figure")
    print(f"{'bank':<28}{'samples':>8}{'checkpoints':>12}{'FID ratio +-':>14}{'KID rel. +-':>13}{'kid / fid':>11}"
          f"{'decided: FID':>14}{'KID':>6}")
    for bank, members in groups.items():
        widths: dict[int, list[tuple[float, float, bool, bool]]] = {}
        no_scale = 0
        for checkpoint_file, base_file in members[: args.limit or None]:
            checkpoint, base = read_per_sample(str(checkpoint_file)), read_per_sample(str(base_file))
            if checkpoint is None or base is None or len(checkpoint) != len(base):
                continue
            figures = paired_intervals(checkpoint, reference, base, resamples=args.resamples, seed=0).figures
            base_kid = figures["kid"]["value"] - figures["kid_diff"]["value"]
            if base_kid <= 0:  # KID is unbiased: a base at or below 0 on this bank has no relative scale
                no_scale += 1
                continue
            fid, kid = figures["fid_ratio"], {k: figures["kid_diff"][k] / base_kid for k in ("value", "low", "high")}
            widths.setdefault(len(checkpoint), []).append((
                (fid["high"] - fid["low"]) / 2, (kid["high"] - kid["low"]) / 2,
                fid["low"] > 1 + TOLERANCE or fid["high"] < 1 + TOLERANCE, kid["low"] > TOLERANCE or kid["high"] < TOLERANCE))
        if no_scale:
            print(f"{bank:<28}{'':>8}{no_scale:>12}  left out: the base's KID on this bank is <= 0 (no relative scale)")
        for samples, rows in sorted(widths.items()):
            fid_w, kid_w = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
            print(f"{bank:<28}{samples:>8}{len(rows):>12}{fid_w:>14.3f}{kid_w:>13.3f}{kid_w / fid_w:>11.2f}"
                  f"{sum(r[2] for r in rows) / len(rows):>14.0%}{sum(r[3] for r in rows) / len(rows):>6.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
