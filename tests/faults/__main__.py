"""The fault suite: bad inputs a hostile-but-fair user would try, and faults injected into real tiny
sweeps on the digits preset (a local Ray per sweep, a real MLflow server on loopback). Prints a line
per case and the totals:

    bad inputs: tried N, clean N
    faults: injected N, survived N; lost: trials N, metrics N, checkpoints N

    .venv/bin/python -m tests.faults [--only bad|faults] [--outage 300]     # from the repo root

The cases are in tests/faults/catalogue.py; what clean and survived mean, in tests/faults/harness.py.
tests/test_faults.py runs the same cases (pytest -m integration; the faults also -m slow).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.faults.catalogue import run_bad_inputs, run_faults
from tests.faults.harness import MlflowServer, report, totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["bad", "faults"], default="")
    parser.add_argument("--outage", type=float, default=300.0, help="seconds MLflow stays down mid-sweep (default 300)")
    parser.add_argument("--work", default="", help="scratch folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="acpo-faults-"))
    work.chmod(0o700)
    server = MlflowServer(work / "mlflow").start()
    try:
        bad = run_bad_inputs(work / "bad", server.uri) if args.only != "faults" else []
        faults = run_faults(work / "faults", server, args.outage) if args.only != "bad" else []
    finally:
        server.stop()
    if bad:
        print("bad inputs:")
        report(bad)
    if faults:
        print("faults:")
        report(faults)
    print(totals(bad, faults))
    return 0 if all(o.ok for o in bad + faults) else 1


if __name__ == "__main__":
    sys.exit(main())
