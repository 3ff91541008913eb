"""`make services` / `make stop`: stop ends exactly the process groups services started (their ids
recorded under runs/), not another process that merely looks like them, and leaves no record of the
stopped head; a sweep started afterwards without `ray job submit` (no address given) starts its own
Ray at once, even when a crashed head's record is left behind; and services refuses a port that
answers for a process it did not start, before starting anything (integration tier)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.servers import free_port, mlflow_server
from tests.sweeps.tiny_sweep import sweep_args
from trainers.config import PROJECT_ROOT

pytestmark = pytest.mark.integration


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # the dashboard answers 401 without a token: it is up
    except OSError:
        return False


def test_stop_ends_what_services_started_and_nothing_else(tmp_path, digits_assets):
    if answers("http://127.0.0.1:8265"):
        pytest.skip("a Ray head already answers on 127.0.0.1:8265; make services would use it")
    port = free_port()
    runs = tmp_path / "runs"
    # a process whose command line matches the old `pkill -f "mlflow server ..."` pattern, and Ray's
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"mlflow server --backend-store-uri sqlite:///{runs}/mlflow.db",
                              "ray start --head"], start_new_session=True)
    make = ["make", "-C", str(PROJECT_ROOT), f"RUNS={runs}", f"MLFLOW_PORT={port}"]
    try:
        subprocess.run([*make, "services"], check=True, timeout=300, capture_output=True)
        assert answers(f"http://127.0.0.1:{port}/health") and answers("http://127.0.0.1:8265")
        started = {name: int((runs / f"{name}.pid").read_text()) for name in ("ray", "mlflow")}
        groups = {name: [int(p) for p in subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()]
                  for name, pid in started.items()}
        assert len(groups["ray"]) > 2 and groups["mlflow"]  # ray start, GCS, raylet, dashboard...; the server and its workers
        stop = subprocess.run([*make, "stop"], check=True, timeout=200, capture_output=True, text=True)
        assert "stopped ray" in stop.stdout and "stopped mlflow" in stop.stdout
        time.sleep(1)
        alive = [pid for pids in groups.values() for pid in pids if os.path.exists(f"/proc/{pid}") and
                 "zombie" not in open(f"/proc/{pid}/status").read()]
        assert alive == [] and not answers(f"http://127.0.0.1:{port}/health") and not answers("http://127.0.0.1:8265")
        assert decoy.poll() is None  # the look-alike lives on
        assert not (runs / "ray.pid").exists() and not (runs / "mlflow.pid").exists()
        from ray._common.utils import get_ray_address_file

        record = Path(get_ray_address_file(None))  # `ray start` wrote it; a head ended by a signal leaves it behind
        assert not (record.is_file() and record.read_text().strip() == "127.0.0.1:6379"), "the stopped head's record is left"
        # docs/demo.md's "A sweep started without `ray job submit`" after `make stop`; the record planted as a head
        # ended by a crash (not `make stop`) leaves it: ray.init would retry that address for ~15 minutes.
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text("127.0.0.1:6379\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with mlflow_server(f"sqlite:///{tmp_path}/sweep-mlflow.db", tmp_path / "sweep-artifacts") as uri:
            started_at = time.time()
            sweep = subprocess.run([sys.executable, str(PROJECT_ROOT / "sweeps" / "acpo_sweep.py"), *sweep_args("after-stop", tmp_path / "sweeps", uri, samples=1)],
                                   env=env, capture_output=True, text=True, timeout=600)
        assert sweep.returncode == 0, sweep.stderr[-2000:]
        assert "the Ray head recorded on this machine (127.0.0.1:6379) does not answer" in sweep.stdout
        assert time.time() - started_at < 300 and not record.exists()
    finally:
        os.killpg(decoy.pid, signal.SIGKILL)
        subprocess.run([*make, "stop"], timeout=200, capture_output=True)


# A stand-in HTTP server on the port given as argv[1]; argv[2] only shows in its command line (ps).
SERVE = "import sys, http.server as h; h.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), h.SimpleHTTPRequestHandler).serve_forever()"


@pytest.mark.parametrize("record", ["none", "another command", "look-alike", "ours"])
def test_services_uses_a_port_that_answers_only_when_it_started_the_listener(tmp_path, record):
    """The MLflow port answers (404 counts); the record in runs/mlflow.pid is missing, names a process
    that is not `mlflow server`, names a look-alike that does not hold the port, or is the listener's
    group. The MLflow check comes before Ray's, so a head on 8265 does not change the outcome."""
    if record == "look-alike" and shutil.which("ss") is None:
        pytest.skip("without ss, services can only check the recorded process, not who holds the port")
    port = free_port()
    runs = tmp_path / "runs"
    runs.mkdir()
    ray_was_up = answers("http://127.0.0.1:8265")
    leader = record == "ours"
    stand_in = subprocess.Popen([sys.executable, "-c", SERVE, str(port), "mlflow server" if leader else "stand-in"],
                                cwd=tmp_path, start_new_session=leader, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "mlflow server" if record == "look-alike" else "other"],
                             start_new_session=True)
    recorded = {"another command": other.pid, "look-alike": other.pid, "ours": stand_in.pid}.get(record)
    if recorded:
        (runs / "mlflow.pid").write_text(f"{recorded}\n")
    before = sorted(runs.iterdir())
    make = ["make", "-C", str(PROJECT_ROOT), f"RUNS={runs}", f"MLFLOW_PORT={port}"]
    try:
        for _ in range(100):
            if answers(f"http://127.0.0.1:{port}/health"):
                break
            time.sleep(0.1)
        if leader:  # -n: the check runs when the recipe is expanded, and nothing is started
            result = subprocess.run([*make, "-n", "services"], capture_output=True, text=True, timeout=60, check=False)
            assert result.returncode == 0 and "answers but" not in result.stderr, result.stderr
            return
        result = subprocess.run([*make, "services"], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode != 0
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert (f"127.0.0.1:{port} answers but is not the MLflow server that 'make services' started ({runs}/mlflow.pid)"
                in lines[0])
        assert sorted(runs.iterdir()) == before  # no log, no new record: nothing was started
        assert answers("http://127.0.0.1:8265") == ray_was_up
        assert stand_in.poll() is None and other.poll() is None
    finally:
        for process in (stand_in, other):
            process.kill()
            process.wait()
        subprocess.run([*make, "stop"], timeout=200, capture_output=True, check=False)
