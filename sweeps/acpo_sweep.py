"""The sweep: Ray Tune + Optuna over the objective's weights and step counts, two objectives at once
(FID down, held-out quality up), every trial a Ray Train fine-tuning, everything tracked in MLflow,
and the champion selected from the Pareto front and registered.

    ray job submit --working-dir . -- python sweeps/acpo_sweep.py             # digits preset
    python sweeps/acpo_sweep.py --preset digits --set sweep.num_samples=4    # joins a running cluster or starts one
    python sweeps/acpo_sweep.py --resume                                      # after an interruption
    python sweeps/acpo_sweep.py --dry-run                                     # resolved config and space

This file is the command line only (`acpo sweep` is the same): the sweep itself is sweeps/driver.py
(`run_sweep`), its trials sweeps/trial.py, the champion's selection sweeps/champion.py, and the
sweep folder's layout trainers/common/layout.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from sweeps.champion import print_summary
from sweeps.driver import preflight, run_sweep, sweep_dir, tracking_uri
from sweeps.presets import load
from sweeps.space import check_space, pin_searched
from trainers.common.credentials import redacted
from trainers.common.errors import report_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acpo_sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config or sweep value, e.g. --set sweep.num_samples=4 (repeatable)")
    parser.add_argument("--num-samples", type=int, default=0, help="trials (default: sweep.num_samples)")
    parser.add_argument("--name", default="", help="experiment name (default: sweep.name)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and search space, then exit")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.num_samples:
        overrides.append(f"sweep.num_samples={args.num_samples}")
    if args.name:
        overrides.append(f"sweep.name={args.name}")
    try:
        config, sweep = load(args.preset, overrides)
        sweep = pin_searched(sweep, overrides)
        check_space(sweep, config)
        if args.dry_run:
            preflight(config, sweep, sweep_dir(sweep), tracking_uri(sweep), args.resume)
            print(json.dumps(redacted({"config": config.to_dict(), "sweep": sweep.model_dump()}), indent=2))
            return 0
        selection = run_sweep(config, sweep, resume=args.resume)
        print_summary(selection, tracking_uri(sweep), sweep)
        return 0
    except Exception as error:  # noqa: BLE001 - report_error re-raises what is not a user error
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
