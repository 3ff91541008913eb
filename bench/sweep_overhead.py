"""What the sweep machinery costs: a real sweep's wall time over the sum of its trials' own time
(set-up, training steps and evaluations, as each trial's trainer clocks them: `time/*` in every
report), measured in one run. The rest is the platform: Ray starting each trial's controller and
workers, Tune and Optuna, the base model's evaluation, checkpoint uploads, MLflow, the selection.

    .venv/bin/python bench/sweep_overhead.py                     # the digits preset, 2 trials, one at a time
    .venv/bin/python bench/sweep_overhead.py --trials 6 --concurrent 2
    .venv/bin/python bench/sweep_overhead.py --tiny              # seconds-long trials (the test suite's size)

Trials run one at a time by default, so that the ratio is wall time over work done (with several
at a time, divide their sum by the concurrency). The fixed cost per trial is then extrapolated to
trials of GPU length: ratio = 1 + overhead per trial / trial length.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY = ["eval.samples=16", "eval.sampling_steps=[2]", "train.batch_size=8", "train.eval_every=2", "sweep.space={objective.anchor.weight: "
        "{loguniform: [1.0, 100.0]}, train.steps: {randint: [2, 4], step: 2}}",
        "sweep.confirm.samples=16", "eval.resamples=100"]  # the confirmation at the same tiny size (the preset's is 3 x 1,000 samples)


def trial_times(directory: Path) -> dict[str, dict[str, float]]:
    """Per trial, its trainer's own clocks summed over its reports (each checkpoint's metrics.json)."""
    from trainers.common.layout import metrics_glob

    times = {}
    for metrics_file in sorted(directory.glob(metrics_glob())):
        metrics = json.loads(metrics_file.read_text())
        own = times.setdefault(metrics_file.parent.parent.name, {"setup": 0.0, "train": 0.0, "eval": 0.0})
        for part in own:
            own[part] += float(metrics.get(f"time/{part}_s", 0.0))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="seconds-long trials, for the tests")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, default=None, help="storage folder (default: a temporary one)")
    args = parser.parse_args(argv)

    from sweeps.acpo_sweep import main as sweep_main
    from tests.faults.harness import MlflowServer  # the fault suite's loopback MLflow server

    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as scratch:
        work = args.work or Path(scratch)
        server = MlflowServer(work / "mlflow").start()
        try:
            overrides = [*(TINY if args.tiny else []), *args.set, f"sweep.storage_dir={work / 'sweeps'}", f"sweep.tracking_uri={server.uri}",
                         f"sweep.max_concurrent={args.concurrent}"]
            argv = ["--preset", args.preset, "--name", "overhead", "--num-samples", str(args.trials),
                    *sum((["--set", item] for item in overrides), [])]
            started = time.perf_counter()
            code = sweep_main(argv)
            wall = time.perf_counter() - started
        finally:
            server.stop()
        if code != 0:
            print(f"sweep_overhead: the sweep failed (exit {code})")
            return code
        times = trial_times(work / "sweeps" / "overhead")

    own = {part: sum(t[part] for t in times.values()) for part in ("setup", "train", "eval")}
    total = sum(own.values())
    busy = total / args.concurrent
    per_trial = (wall - busy) * args.concurrent / len(times)
    print(f"device: cpu; {len(times)} trials of the {args.preset} preset{' (tiny)' if args.tiny else ''}, {args.concurrent} at a time")
    print(f"wall time of the sweep:         {wall:8.1f} s")
    print(f"trials' own time:               {total:8.1f} s  (set-up {own['setup']:.1f}, training {own['train']:.1f}, "
          f"evaluation {own['eval']:.1f})")
    print(f"platform's time per trial:      {per_trial:8.1f} s  (Ray actors, Tune, base evaluation, uploads, MLflow, selection)")
    for minutes in (10, 60):
        print(f"  with {minutes:>2}-minute GPU trials:     ratio {1 + per_trial / (60 * minutes):.3f}")
    print(f"sweep_overhead: ratio {wall / busy:.3f} (wall time / trials' own time{' / concurrency' if args.concurrent > 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
