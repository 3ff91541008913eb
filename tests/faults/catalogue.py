"""The fault suite's cases: the bad inputs a hostile-but-fair user would try (bad_inputs, and the
probes run_bad_inputs adds), and each fault injected into a real tiny sweep as a function, run in the
order of run_faults. Needs root for the two mounts (a read-only folder; a full disk): without it
those two cases are reported as not run. The object-store case runs moto's S3 server behind a
loopback proxy (tests/servers.py), so the store can refuse connections and come back with its objects.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.faults.harness import (ROOT, TINY, MlflowServer, Outcome, finished, judged, kill_group, read_only, run_probe, start_driver,
                                  sweep_args, wait_for)

# ---------------------------------------------------------------------------------------------- bad inputs


def bad_input_files(work: Path) -> dict[str, Path]:
    """The broken files and folders the probes name."""
    import shutil

    files = {}
    work.mkdir(parents=True, exist_ok=True)
    files["random"] = work / "random.safetensors"
    files["random"].write_bytes(os.urandom(4096))
    classifier = ROOT / "assets" / "digits" / "classifier.safetensors"
    files["truncated"] = work / "classifier-truncated.safetensors"
    files["truncated"].write_bytes(classifier.read_bytes()[: classifier.stat().st_size // 2])
    files["empty"] = work / "empty-folder"
    files["empty"].mkdir(exist_ok=True)
    files["texts"] = work / "text-folder"
    files["texts"].mkdir(exist_ok=True)
    for i in range(3):
        (files["texts"] / f"note{i}.txt").write_text("not an image\n")
    files["yaml"] = work / "broken.yaml"
    files["yaml"].write_text("train: [steps: 3\n")
    files["base"] = work / "base-truncated"
    shutil.rmtree(files["base"], ignore_errors=True)
    shutil.copytree(ROOT / "assets" / "digits" / "base", files["base"])
    weights = files["base"] / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    files["others"] = work / "writable-by-others"
    files["others"].mkdir(exist_ok=True)
    files["others"].chmod(0o777)
    files["readonly"] = work / "read-only"
    files["readonly"].mkdir(exist_ok=True)
    return files


def bad_inputs(work: Path) -> list[tuple[str, list[str], dict, str]]:
    """(name, sweep arguments after the storage/tracking ones, environment, what the error line must say)."""
    f = bad_input_files(work)
    nr = "objective.nr_iqa.metric={arch: cnniqa, weights: %s}"
    return [
        ("unknown key", ["--set", "train.nosuch=1"], {}, "unknown key 'train.nosuch'"),
        ("wrong type", ["--set", "train.steps=ten"], {}, "train.steps"),
        ("out of range", ["--set", "train.learning_rate=-1"], {}, "train.learning_rate"),
        ("missing weights file", ["--set", "eval.heldout_quality.weights=/nonexistent.safetensors"], {}, "eval.heldout_quality.weights"),
        ("unknown preset", ["--preset", "nosuch"], {}, "unknown preset"),
        ("--resume of nothing", ["--resume"], {}, "--resume"),
        ("malformed --set", ["--set", "train.steps"], {}, "expected key=value"),
        ("broken YAML preset", ["--preset", str(f["yaml"])], {}, "not valid YAML"),
        ("unknown space key", ["--set", "sweep.space.train.warmup={randint: [1, 5]}"], {}, "sweep.space.train.warmup"),
        ("reversed range", ["--set", "sweep.space.objective.anchor.weight={loguniform: [10, 1]}"], {}, "must be below"),
        ("unknown algorithm", ["--set", "sweep.algorithm=grid"], {}, "sweep.algorithm"),
        ("unknown term", ["--set", "objective.nosuch=1"], {}, "objective.nosuch"),
        ("negative weight", ["--set", "objective.denoise=-1"], {}, "objective.denoise.weight"),
        ("NaN term weight", ["--set", "objective.anchor.weight=.nan"], {}, "objective.anchor.weight"),
        ("infinite term weight", ["--set", "objective.nr_iqa.weight=.inf"], {}, "objective.nr_iqa.weight"),
        ("NaN learning rate", ["--set", "train.learning_rate=.nan"], {}, "train.learning_rate"),
        ("infinite log-uniform bound", ["--set", "sweep.space.train.learning_rate={loguniform: [1.0e-5, .inf]}"], {},
         "sweep.space.train.learning_rate"),
        ("one evaluation sample", ["--set", "eval.samples=1"], {}, "eval.samples"),
        ("unknown quality model", ["--set", "eval.trained_quality=nosuch"], {}, "eval.trained_quality"),
        ("t_range beyond the scheduler", ["--set", "objective.nr_iqa.x0.t_range=[0, 5000]"], {}, "objective.nr_iqa.x0.t_range"),
        ("reward weights of random bytes", ["--set", nr % f["random"]], {}, str(f["random"])),
        ("held-out weights of random bytes", ["--set", f"eval.heldout_quality.weights={f['random']}"], {}, str(f["random"])),
        ("truncated feature extractor", ["--set", f"eval.feature_extractor_weights={f['truncated']}"], {}, str(f["truncated"])),
        ("truncated base model", ["--set", f"model.base={f['base']}"], {}, "model.base"),
        ("data folder missing", ["--set", "data.source=folder", "--set", f"data.path={work / 'no-such-folder'}"], {}, "data.path"),
        ("data folder empty", ["--set", "data.source=folder", "--set", f"data.path={f['empty']}"], {}, "data.path"),
        ("data folder of text files", ["--set", "data.source=folder", "--set", f"data.path={f['texts']}"], {}, "data.path"),
        ("tracking server down", ["--set", "sweep.tracking_uri=http://127.0.0.1:9"], {}, "sweep.tracking_uri"),
        ("RAY_ADDRESS with nothing there", [], {"RAY_ADDRESS": "127.0.0.1:9"}, "RAY_ADDRESS"),
        ("workers beyond the cluster's CPUs", ["--set", "train.workers=64"], {"RAY_ADDRESS": "local"}, "train.workers"),
        ("storage writable by others", ["--set", f"sweep.storage_dir={f['others']}"], {}, "writable by others"),
        ("read-only storage", ["--set", f"sweep.storage_dir={f['readonly']}"], {}, "sweep.storage_dir"),
        ("read-only latent cache", ["--preset", "digits-t2i", "--set", f"data.cache_dir={f['readonly']}/latents"], {}, "data.cache_dir"),
        ("negative DataLoader workers", ["--set", "data.workers=-1"], {}, "data.workers"),
    ]


def pin_probe(storage: Path, uri: str) -> Outcome:
    """`--set` on a searched key pins that dimension and says so."""
    from sweeps.acpo_sweep import main

    storage.mkdir(parents=True, exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*sweep_args("probe-pin", storage, uri), "--set", "train.steps=20", "--dry-run"])
    space = json.loads(out.getvalue())["sweep"]["space"] if code == 0 else {}
    ok = code == 0 and "train.steps" not in space and "pins a searched dimension" in err.getvalue()
    return Outcome("--set on a searched key", ok, "pinned, said so" if ok else f"exit {code}, space {sorted(space)}")


def collision_probe(storage: Path, uri: str) -> Outcome:
    """A sweep name another sweep folder already uses in MLflow is refused."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("probe-taken") or client.get_experiment(client.create_experiment("probe-taken"))
    client.create_run(experiment.experiment_id, tags={"acpo.sweep": "probe-taken", "acpo.role": "sweep", "acpo.sweep_id": "elsewhere",
                                                      "acpo.folder": "/elsewhere/probe-taken"})
    return run_probe("name used in MLflow by another folder", [], {"RAY_ADDRESS": "local"}, "already used in MLflow", storage, uri,
                     sweep_name="probe-taken")


def run_bad_inputs(work: Path, uri: str) -> list[Outcome]:
    outcomes = []
    for number, (name, args, env, expect) in enumerate(bad_inputs(work / "files")):
        storage = work / f"storage-{number}"
        if name.startswith("read-only"):  # the storage folder, or the latent cache's
            storage = work / "files" / "read-only" if name == "read-only storage" else storage
            with read_only(work / "files" / "read-only"):
                outcomes.append(run_probe(name, args, env, expect, storage, uri))
        else:
            if name == "storage writable by others":
                storage = work / "files" / "writable-by-others"
            outcomes.append(run_probe(name, args, env, expect, storage, uri))
    taken = work / "storage-taken"
    (taken / "probe" / "tune").mkdir(parents=True, exist_ok=True)
    outcomes.append(run_probe("name collision on disk", [], {}, "already holds a sweep", taken, uri))
    outcomes.append(pin_probe(work / "storage-pin", uri))
    outcomes.append(collision_probe(work / "storage-mlflow", uri))
    return outcomes


# ---------------------------------------------------------------------------------------------- faults


def fault_corrupt_newest_checkpoint(work: Path, uri: str) -> Outcome:
    """The driver killed mid-trial; the trial's newest checkpoint then corrupted; --resume."""
    name, log = "fault-corrupt", work / "corrupt.log"
    # Evaluations slow enough (64 samples, 8 sampling steps) that the kill lands mid-trial.
    extra = ["sweep.max_concurrent=1", "train.steps=12", "eval.samples=64", "eval.sampling_steps=[8]", "sweep.confirm.samples=64"]
    driver = start_driver(name, work, uri, 1, extra, log)
    trials = work / name / "trials"

    def registered_two():
        snapshots = list(trials.glob("*/checkpoint_manager_snapshot.json"))
        return snapshots and "step_000004" in snapshots[0].read_text()

    wait_for(registered_two, 400, "a trial's second registered checkpoint", poll=0.05)
    kill_group(driver)
    # The checkpoint a resume starts from: the newest Ray Train registered (its snapshot names them).
    snapshot = next(trials.glob("*/checkpoint_manager_snapshot.json"))
    registered = json.loads(snapshot.read_text())["checkpoint_results"]
    newest = snapshot.parent / registered[-1]["checkpoint_dir_name"]
    weights = newest / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code = finished(start_driver(name, work, uri, 1, extra, log, resume=True))
    text = log.read_text()
    # The resumed run reads the corrupted checkpoint, gives way to the older one and writes the step again;
    # when it resumes past it (the kill landed after a later checkpoint's upload but before Ray Train's
    # record of it), the corrupted folder stays: broken on purpose, it must then not be the champion.
    from trainers.checkpoint import verify_checkpoint

    try:
        verify_checkpoint(newest)
        rewritten = "; written again" if "cannot resume from it" in text else "; written again (the resume did not report reading it)"
    except Exception:  # noqa: BLE001 - left as corrupted
        rewritten = "; left corrupted, not resumed from"
    note = f"corrupted {newest.name}" + ("; resumed from an older checkpoint" if "cannot resume from it" in text else "") + rewritten
    outcome = judged("corrupt newest checkpoint on resume", code, work / name, uri, name, 1, note, broken={str(newest)})
    champion = (json.loads((work / name / "selection.json").read_text()).get("champion") or {}) if code == 0 else {}
    if champion.get("checkpoint") == str(newest) and "left corrupted" in rewritten:
        outcome.ok, outcome.detail = False, f"the corrupted {newest.name} was selected as champion; {outcome.detail}"
    return outcome


def fault_corrupt_at_selection(work: Path, uri: str) -> Outcome:
    """After a finished sweep, the champion's checkpoint corrupted; `acpo select` again."""
    name = "fault-corrupt"
    directory = work / name
    before = json.loads((directory / "selection.json").read_text())["champion"]
    broken = Path(before["checkpoint"])
    weights = broken / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = subprocess.run([sys.executable, "-m", "sweeps.cli", "select", "--sweep", name, "--set", f"sweep.storage_dir={work}",
                             "--set", f"sweep.tracking_uri={uri}", *sum((["--set", item] for item in TINY), [])],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    selection = json.loads((directory / "selection.json").read_text())
    skipped = [u["checkpoint"] for u in selection.get("unreadable", [])]
    champion = selection.get("champion")
    ok = result.returncode == 0 and str(broken) in skipped and champion is not None and champion["checkpoint"] != str(broken)
    note = f"champion {broken.name} corrupted; skipped, new champion {champion['trial']}/{champion['checkpoint'].rsplit('/', 1)[-1]}" \
        if ok else f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"
    return Outcome("corrupt champion at selection", ok, note)


def fault_driver_killed_in_selection(work: Path, uri: str) -> Outcome:
    name, log = "fault-select", work / "select.log"
    driver = start_driver(name, work, uri, 2, ["sweep.max_concurrent=1"], log)
    wait_for(lambda: "selecting the champion" in log.read_text(), 600, "the selection", poll=0.05)
    kill_group(driver)
    code = finished(start_driver(name, work, uri, 2, ["sweep.max_concurrent=1"], log, resume=True))
    return judged("driver killed during selection", code, work / name, uri, name, 2, "killed while selecting; --resume selected")


def fault_worker_killed_in_checkpoint_write(work: Path, uri: str) -> Outcome:
    import psutil

    name, log = "fault-worker", work / "worker.log"
    extra = ["sweep.max_concurrent=1", "train.steps=12"]
    driver = start_driver(name, work, uri, 1, extra, log)
    workdir = work / name / "work"
    writing = lambda: any(p.name.startswith(".step_") for p in workdir.glob("*/checkpoints/.step_*"))  # noqa: E731
    wait_for(writing, 600, "a checkpoint write", poll=0.01)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    code = finished(driver)
    return judged("worker killed during a checkpoint write", code, work / name, uri, name, 1, f"killed {len(workers)} worker(s) mid-write")


def fault_mlflow_outage(work: Path, server: MlflowServer, outage: float) -> Outcome:
    name, log = "fault-outage", work / "outage.log"
    extra = ["sweep.max_concurrent=1", f"sweep.tracking_wait_s={outage + 600:g}"]
    driver = start_driver(name, work, server.uri, 3, extra, log)
    wait_for(lambda: (work / name / "work").is_dir() and any((work / name / "work").glob("*/tracking")), 600, "the first trial")
    server.stop()
    down = time.time()
    while time.time() - down < outage and driver.poll() is None:
        time.sleep(1)
    still_training = driver.poll() is None
    time.sleep(max(0.0, outage - (time.time() - down)))
    server.start()
    code = finished(driver, outage + 900)
    note = f"MLflow down {outage:.0f} s mid-sweep ({'the sweep trained on meanwhile' if still_training else 'the sweep finished training meanwhile'})"
    return judged("MLflow down mid-sweep", code, work / name, server.uri, name, 3, note)


def fault_disk_full(work: Path, uri: str) -> Outcome:
    """The storage folder on a 30 MB tmpfs: full at the second checkpoint; then grown, --resume."""
    if os.geteuid() != 0:
        return Outcome("disk full in the storage folder", False, "not run: mounting a tmpfs needs root")
    name, log = "fault-disk", work / "disk.log"
    mount = work / "small-disk"
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        extra = ["sweep.max_concurrent=1", "train.steps=6"]
        code = finished(start_driver(name, mount, uri, 1, extra, log))
        tail = [line for line in log.read_text().splitlines() if line.startswith("acpo: error:")]
        full = code == 2 and tail and ("No space left" in tail[-1] or "MB free" in tail[-1])
        subprocess.run(["mount", "-o", "remount,size=400m", str(mount)], check=True)
        code = finished(start_driver(name, mount, uri, 1, extra, log, resume=True))
        note = f"failed in one line ({tail[-1][13:90]}...), grown, resumed" if full else f"first run: {tail[-1:] or 'no one-line error'}"
        outcome = judged("disk full in the storage folder", code, mount / name, uri, name, 1, note)
        outcome.ok = outcome.ok and bool(full)
        return outcome
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fault_object_store_outage(work: Path, uri: str, outage: float = 60) -> Outcome:
    """The sweep on S3 (moto's server behind a loopback proxy): the store taken off the network for
    `outage` seconds mid-sweep (every connection refused), then back; --resume when the sweep did not
    finish every trial. Judged on a copy of the sweep's folder in the bucket."""
    from tests import servers
    from trainers.common import storage

    name, log = "fault-store", work / "store.log"
    with servers.s3_server() as bucket:
        moto = os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)
        proxy = servers.Proxy((moto[0].removeprefix("http://"), int(moto[1]))).start()
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        folder = f"{bucket}/faults"
        extra = ["sweep.max_concurrent=1", "train.steps=6"]
        driver = start_driver(name, folder, uri, 3, extra, log, env=env)
        wait_for(lambda: any("/work/" in key and "/tracking/" in key for key in servers.s3_keys(f"faults/{name}/")), 600,
                 "the first trial", poll=0.5)
        proxy.stop()
        time.sleep(outage)
        still_running = driver.poll() is None
        proxy.start()
        code = finished(driver)
        text = log.read_text()
        tail = [line for line in text.splitlines() if line.startswith("acpo: error:")]
        rode = code == 0 and "trial(s) failed" not in text
        how = "rode it out" if rode else f"first run: {f'exit {code}, ' + tail[-1][13:100] if tail else 'some trials failed'}; --resume"
        if not rode:
            code = finished(start_driver(name, folder, uri, 3, extra, log, resume=True, env=env))
        retried = "retrying for up to" in text
        with storage.local_copy(f"{folder}/{name}") as copy:
            outcome = judged("object store down mid-sweep", code, copy, uri, name, 3,
                             f"S3 refused connections for {outage:.0f} s ({'the sweep ran on meanwhile' if still_running else 'the sweep ended meanwhile'}"
                             f"{', our writes retried' if retried else ''}); {how}")
        proxy.stop()
    return outcome


def fault_two_drivers(work: Path, uri: str) -> Outcome:
    """A second driver on a running sweep (--resume, and a second submit of the same name): refused in one
    line naming the first, within seconds; the first finishes undisturbed."""
    name, log = "fault-twice", work / "twice.log"
    extra = ["sweep.max_concurrent=1"]
    first = start_driver(name, work, uri, 2, extra, log)
    wait_for(lambda: (work / name / "driver.lease").is_file() and (work / name / "work").is_dir(), 600, "the first driver's trials")
    problems = []
    for resume in (True, False):
        second_log = work / f"twice-second-{resume}.log"
        started = time.time()
        code = finished(start_driver(name, work, uri, 2, extra, second_log, resume=resume), 120)
        lines = [line for line in second_log.read_text().splitlines() if line.startswith("acpo: error:")]
        expect = f"driver pid {first.pid}" if resume else "already holds a sweep"
        if code != 2 or len(lines) != 1 or expect not in lines[0]:
            problems.append(f"second driver ({'--resume' if resume else 'same name'}): exit {code}, {lines[-1:] or 'no error line'}")
        elif time.time() - started > 60:
            problems.append(f"second driver took {time.time() - started:.0f} s to refuse")
    code = finished(first)
    note = "a second --resume refused in one line naming the first driver, a second start of the name in one line; the first finished"
    outcome = judged("a second driver on a running sweep", code, work / name, uri, name, 2, note)
    if problems:
        outcome.ok, outcome.detail = False, "; ".join([*problems, outcome.detail])
    return outcome


def run_faults(work: Path, server: MlflowServer, outage: float) -> list[Outcome]:
    work.mkdir(parents=True, exist_ok=True)
    cases = [lambda: fault_corrupt_newest_checkpoint(work, server.uri), lambda: fault_corrupt_at_selection(work, server.uri),
             lambda: fault_driver_killed_in_selection(work, server.uri), lambda: fault_worker_killed_in_checkpoint_write(work, server.uri),
             lambda: fault_disk_full(work, server.uri), lambda: fault_object_store_outage(work, server.uri),
             lambda: fault_two_drivers(work, server.uri), lambda: fault_mlflow_outage(work, server, outage)]
    outcomes = []
    for case in cases:
        try:
            outcomes.append(case())
        except Exception as error:  # noqa: BLE001 - a case that breaks is reported, the others still run
            outcomes.append(Outcome(getattr(case, "__name__", "fault"), False, f"{type(error).__name__}: {error}"))
        o = outcomes[-1]
        print(f"[faults] {o.name}: {'survived' if o.ok else 'NOT survived'} ({o.detail}; lost: trials {o.lost_trials}, "
              f"metrics {o.lost_metrics}, checkpoints {o.lost_checkpoints})", flush=True)
    return outcomes
