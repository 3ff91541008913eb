"""The trainer on Ray Train: two CPU workers through the CLI, a worker killed mid-run, a NaN run."""

import os
import signal
import threading
import time

import pytest
import ray

from sweeps.cli import main
from sweeps.presets import load
from trainers.ray_train import run_training

pytestmark = pytest.mark.integration  # a local Ray instance, worker processes, a kill

QUICK = ["eval.samples=8", "eval.sampling_steps=[1]", "train.batch_size=8", "train.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never a running cluster
    yield
    ray.shutdown()


def listeners_of_train_workers(seen: set, stop: threading.Event) -> None:
    """Every (pid, listening TCP address) of a Ray Train worker process (`ss -ltnp`), until `stop`."""
    import re
    import subprocess

    while not stop.wait(0.1):
        for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
            if "RayTrainWo" in line:
                seen.add((re.search(r"pid=(\d+)", line).group(1), line.split()[3]))


def test_cli_trains_on_two_workers(tmp_path, capsys, local_ray, digits_assets):
    seen, stop = set(), threading.Event()
    watcher = threading.Thread(target=listeners_of_train_workers, args=(seen, stop), daemon=True)
    watcher.start()
    try:
        code = main(["train", "--workers", "2", *sum((["--set", o] for o in QUICK), []), "--set", "train.steps=3",
                     "--set", f"train.output_dir={tmp_path}"])
    finally:
        stop.set()
        watcher.join()
    # One machine: the process group's rendezvous store and Gloo listen on loopback only (trainers/ray_train.py:
    # OneMachineTorchConfig); torch alone binds its store to every interface ("*:port"). Each worker keeps one
    # listener on every interface, Ray's own (its core worker's gRPC server, in a local Ray instance).
    wildcard = [pid for pid, address in seen if address.startswith(("*:", "0.0.0.0:", "[::]:"))]
    loopback = {pid for pid, address in seen if address.startswith("127.0.0.1:")}
    assert len(loopback) == 2 and all(wildcard.count(pid) <= 1 for pid in wildcard), seen
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fid@1" in out and "step 3, checkpoint:" in out
    checkpoint = out.split("checkpoint: ")[1].split()[0]
    assert os.path.isdir(os.path.join(checkpoint, "model", "unet"))


def test_a_killed_worker_resumes_from_the_last_checkpoint(tmp_path, local_ray, digits_assets):
    config, _ = load("digits", [*QUICK, "train.workers=2", "train.steps=40", "train.eval_every=10", "train.max_failures=2",
                                f"train.output_dir={tmp_path / 'run'}"])
    storage = tmp_path / "storage"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(config, name="killed", storage_path=storage)))
    started = time.time() - 1  # psutil's create_time has a coarse clock
    thread.start()
    # Wait until Ray has *registered* step 10 (its checkpoint manager persists a snapshot naming it);
    # a checkpoint folder existing only means the upload began, and a kill then can lose the report.
    snapshot = storage / "killed" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 180
    while not (snapshot.exists() and "step_000010" in snapshot.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    assert snapshot.exists() and "step_000010" in snapshot.read_text(), "step 10 not registered within 3 minutes"
    import psutil

    # This run's workers: a previous test's workers may still be exiting under the same name.
    workers = [p for p in psutil.process_iter(["cmdline", "create_time"])
               if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= started]
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=300)
    result = outcome["result"]
    assert result.metrics["step"] == 40
    assert result.metrics["resumed_from"] >= 10  # the restarted workers started from a checkpoint, not from 0
    assert sorted(p.name for p in (storage / "killed").glob("step_*")) == [f"step_{s:06d}" for s in (10, 20, 30, 40)]
    assert [m["step"] for _, m in result.best_checkpoints] == [10, 20, 30, 40]


def test_nan_through_ray_is_one_line(tmp_path, capsys, local_ray, digits_assets):
    code = main(["train", *sum((["--set", o] for o in QUICK), []), "--set", "train.steps=30", "--set", "train.learning_rate=1e30",
                 "--set", "train.grad_clip=0", "--set", "train.max_failures=0", "--set", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("acpo: error: non-finite loss at step") and "denoise" in err[-1]  # the worker's own message
