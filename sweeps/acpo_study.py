"""A study: several methods, each an objective with its own search space, swept under the same budget
and the same seeds on one base model, then compared on one report.

    acpo study --preset digits                                    # sweeps/studies/digits.yaml
    ray job submit --working-dir . -- python sweeps/acpo_study.py --preset sd15 --seeds 3
    python sweeps/acpo_study.py --preset digits --resume          # after an interruption
    acpo study --study my-study.yaml                              # a study file of your own

This file is the command line only (`acpo study` is the same): the study itself, every (method, seed)
an ordinary sweep, and its report are sweeps/study.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sweeps.driver import sweep_dir
from sweeps.study import check_study, method_sweep, read_study, run_study
from trainers.common.credentials import redacted
from trainers.common.errors import ConfigError, report_error
from trainers.common.storage import is_remote


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acpo_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", "--preset", default="digits",
                        help="a shipped study, named for its base preset (sweeps/studies/NAME.yaml: digits, digits-t2i, "
                             "cifar10, sd15), or a YAML file")
    parser.add_argument("--seeds", type=int, default=0, help="use seeds 0..N-1 (default: the study's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study field, e.g. --set trials=1 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study of the same name")
    parser.add_argument("--dry-run", action="store_true", help="validate every method's config and print the study")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"seeds={list(range(args.seeds))}"] if args.seeds else [])
    try:
        study = read_study(args.study, overrides)
        if is_remote(study.storage_dir):  # its report and per-method sweeps are read as local files
            raise ConfigError(f"study.storage_dir: {study.storage_dir}: a study needs a folder (shared on a cluster); "
                              "object storage is for a single sweep's sweep.storage_dir")
        _, first = method_sweep(study, next(iter(study.methods)), study.seeds[0], Path("."))
        directory = Path(sweep_dir(first.model_copy(update={"storage_dir": study.storage_dir, "name": study.name})))
        if args.dry_run:
            check_study(study, directory, resume=True if (directory / "study.json").is_file() else False)
            print(json.dumps(redacted(study.model_dump()), indent=2))
            return 0
        run_study(study, directory, resume=args.resume)
        return 0
    except Exception as error:  # noqa: BLE001 - report_error re-raises what is not a user error
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
