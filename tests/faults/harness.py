"""The fault suite's harness: the MlflowServer it stops and starts, the sweep driver as a process of
its own, waiting, and the judging; an Outcome per case, the report and the totals. The cases are in
tests/faults/catalogue.py, the command line in tests/faults/__main__.py.

A bad input is clean when the sweep exits 2 with one `acpo: error:` line naming the field or file,
no traceback, within a minute, and leaves nothing in the storage folder (`--set` on a searched key
is clean when it pins the dimension and says so). A fault is survived when the sweep (resumed where
the fault killed it) ends with every trial, every checkpoint it evaluated loading, and every
evaluation's figures in MLflow exactly once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TINY = ["train.batch_size=8", "train.eval_every=2", "eval.samples=16", "sweep.confirm.samples=16", "sweep.confirm.top_k=0", "eval.resamples=100", "eval.sampling_steps=[2]", "train.cpus_per_worker=1",
        "sweep.space.train.steps={randint: [2, 4], step: 2}"]


@dataclass
class Outcome:
    name: str
    ok: bool
    detail: str
    lost_trials: int = 0
    lost_metrics: int = 0
    lost_checkpoints: int = 0


class MlflowServer:
    """`mlflow server` on SQLite and loopback; stop() and start() again on the same port and database."""

    def __init__(self, folder: Path):
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "MlflowServer":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import urllib.request

        for _ in range(240):
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


def sweep_args(name: str, storage: Path, uri: str, samples: int = 2, *extra: str) -> list[str]:
    return ["--name", name, "--num-samples", str(samples), "--set", f"sweep.storage_dir={storage}", "--set", f"sweep.tracking_uri={uri}",
            *sum((["--set", item] for item in [*TINY, *extra]), [])]


# ---------------------------------------------------------------------------------------------- bad inputs


def run_probe(name: str, args: list[str], env: dict, expect: str, storage: Path, uri: str, sweep_name: str = "probe") -> Outcome:
    """One bad input through the sweep's entry point, in this process (later --set values win)."""
    from sweeps.acpo_sweep import main

    storage.mkdir(parents=True, exist_ok=True)
    before = set(storage.rglob("*"))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    started = time.time()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([*sweep_args(sweep_name, storage, uri), *args])
            except BaseException as error:  # noqa: BLE001 - a probe that escapes is a finding, not a crash of the suite
                code, err = -1, io.StringIO(f"uncaught {type(error).__name__}: {error}")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import ray

        if ray.is_initialized():
            ray.shutdown()
    seconds = time.time() - started
    lines = [line for line in err.getvalue().splitlines() if line.startswith("acpo: error:")]
    left = set(storage.rglob("*")) - before
    problems = []
    if code != 2:
        problems.append(f"exit {code}")
    if len(lines) != 1 or expect not in lines[0]:
        problems.append(f"error lines {lines[:2] or err.getvalue().strip().splitlines()[-1:]}")
    if "Traceback" in err.getvalue():
        problems.append("a traceback")
    if left:
        problems.append(f"left {len(left)} file(s) in the storage folder")
    if seconds > 60:
        problems.append(f"took {seconds:.0f} s")
    return Outcome(name, not problems, "; ".join(problems) or (lines[0][len("acpo: error: "):][:150]))


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` read-only for everyone, root included (a read-only tmpfs mounted on it); None without root."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield True
        finally:
            folder.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
    try:
        yield True
    finally:
        subprocess.run(["umount", str(folder)], check=False)


# ---------------------------------------------------------------------------------------------- faults


def start_driver(name: str, storage: Path | str, uri: str, samples: int, extra: list[str], log: Path, resume: bool = False,
                 env: dict | None = None) -> subprocess.Popen:
    """The sweep driver as its own process group with its own local Ray (never a cluster the user runs)."""
    command = [sys.executable, str(ROOT / "sweeps" / "acpo_sweep.py"), *sweep_args(name, storage, uri, samples, *extra)]
    return subprocess.Popen([*command, *(["--resume"] if resume else [])], env={**os.environ, "RAY_ADDRESS": "local", **(env or {})},
                            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(2)  # the group's Ray processes go with it


def wait_for(condition, seconds: float, what: str, poll: float = 0.2) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise TimeoutError(f"{what} did not happen within {seconds:.0f} s")


def finished(process: subprocess.Popen, seconds: float = 900) -> int:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        kill_group(process)
        return -9


def losses(directory: Path, uri: str, name: str, trials: int, deliberately_broken: set[str] = frozenset()) -> tuple[int, int, int, list[str]]:
    """What a finished sweep lost: trials not finished, evaluations missing from (or doubled in)
    MLflow, checkpoints that do not load (other than those the fault broke on purpose)."""
    from mlflow.tracking import MlflowClient

    from trainers.checkpoint import verify_checkpoint

    problems = []
    lost_checkpoints = 0
    for checkpoint in sorted(directory.glob("trials/*/step_*")):
        if str(checkpoint) in deliberately_broken:
            continue
        try:
            verify_checkpoint(checkpoint)
        except Exception as error:  # noqa: BLE001
            lost_checkpoints += 1
            problems.append(str(error)[:120])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = {r.data.tags.get("acpo.trial"): r for r in client.search_runs([experiment.experiment_id], max_results=500)
            if r.data.tags.get("acpo.role") == "trial"}
    lost_trials = max(0, trials - sum(r.info.status == "FINISHED" for r in runs.values()))  # a trial's run ends FINISHED after its fit
    lost_metrics = 0
    for trial_dir in sorted(directory.glob("trials/*")):
        if not trial_dir.is_dir():
            continue
        steps = sorted(int(p.parent.name.split("_")[1]) for p in trial_dir.glob("step_*/metrics.json"))
        run = runs.get(trial_dir.name)
        history = [m.step for m in client.get_metric_history(run.info.run_id, "fid")] if run else []
        missing = [s for s in steps if s not in history]
        doubled = len(history) - len(set(history))
        lost_metrics += len(missing)
        if doubled:
            problems.append(f"trial {trial_dir.name}: {doubled} evaluation(s) logged twice")
    return lost_trials, lost_metrics, lost_checkpoints, problems


def judged(name: str, code: int, directory: Path, uri: str, sweep: str, trials: int, note: str, broken=frozenset()) -> Outcome:
    if code != 0:
        return Outcome(name, False, f"exit {code}; {note}", lost_trials=trials)
    lost_trials, lost_metrics, lost_checkpoints, problems = losses(directory, uri, sweep, trials, broken)
    selection = json.loads((directory / "selection.json").read_text())
    if selection.get("champion") is None:
        problems.append("no champion")
    ok = not (lost_trials or lost_metrics or lost_checkpoints or problems)
    return Outcome(name, ok, "; ".join([note, *problems]), lost_trials, lost_metrics, lost_checkpoints)


# ---------------------------------------------------------------------------------------------- report


def report(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        print(f"  {'ok ' if o.ok else 'BAD'}  {o.name:<40} {o.detail}")


def totals(bad: list[Outcome], faults: list[Outcome]) -> str:
    return (f"bad inputs: tried {len(bad)}, clean {sum(o.ok for o in bad)}\n"
            f"faults: injected {len(faults)}, survived {sum(o.ok for o in faults)}; lost: trials {sum(o.lost_trials for o in faults)}, "
            f"metrics {sum(o.lost_metrics for o in faults)}, checkpoints {sum(o.lost_checkpoints for o in faults)}")
