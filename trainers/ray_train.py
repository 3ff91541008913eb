"""The trainer on Ray Train: `trainers.loop.train` on every worker of a `TorchTrainer`.

This is the only trainer module that imports ray. Ray Train sets up the process group (gloo on CPU,
nccl on GPU), restarts failed workers up to `train.max_failures` times from the last reported
checkpoint (`ray.train.get_checkpoint()`), and keeps the reported checkpoints in its storage. A
sweep trial builds the same trainer inside its Tune function (Train V2).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import ray
import ray.train
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import (  # ray 2.60, pinned
    _set_torch_distributed_env_vars,
    _TorchBackend,
)

from trainers.common.errors import TrainingError, UnreadableCheckpointError, root_message
from trainers.common.layout import CHECKPOINT_GLOB
from trainers.common.storage import resolve
from trainers.config import Config


def train_worker(config_dict: dict) -> None:
    """What every Ray Train worker runs."""
    config = Config.from_dict(config_dict)
    if config.train.output_dir:
        run_worker(config)
        return
    # A scratch folder of this worker's own (mkdtemp: mode 0700, a new name each time, so two sweeps of
    # one name, or two users of one node, never share or delete each other's), removed when it ends.
    remove_orphaned_scratch()
    scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    try:
        run_worker(config.model_copy(update={"train": config.train.model_copy(update={"output_dir": scratch})}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


SCRATCH_PREFIX = "acpo-scratch-"


def remove_orphaned_scratch() -> None:
    """This user's scratch folders left on this node by workers that were killed (their process is gone):
    what they staged was uploaded already, or is lost with the step Ray Train resumes before."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name.removeprefix(SCRATCH_PREFIX).split("-")[0]
        try:
            if folder.stat().st_uid != os.geteuid() or not pid.isdigit():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # another user's process, or the folder went meanwhile
            continue


def run_worker(config: Config) -> None:
    from trainers.loop import train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    system = SystemMetrics().start() if rank == 0 else None  # rank 0's report is the one the sweep keeps

    def report(metrics: dict, checkpoint: Path | None = None) -> None:
        if system is not None:
            metrics = {**metrics, **system.since_last()}
        # Only rank 0 writes checkpoints; every rank reports (ray.train.report is a barrier).
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint)) if checkpoint else None,
                         checkpoint_dir_name=Path(checkpoint).name if checkpoint else None,
                         delete_local_checkpoint_after_upload=checkpoint is not None)

    restored = ray.train.get_checkpoint()
    if restored is None:
        train(config, report, rank, world_size)
        return
    # A restart after a failure: same step, same data order. The newest checkpoint first; one that
    # cannot be read (corrupted, cut short) gives way to the next older one of the same run, each read
    # where Ray keeps it (a folder, or downloaded from object storage), and with none left the run starts over.
    for candidate in [restored.path, *older_checkpoints(restored)]:
        with Checkpoint(candidate, filesystem=restored.filesystem).as_directory() as path:
            try:
                train(config, report, rank, world_size, resume_from=Path(path))
                return
            except UnreadableCheckpointError as error:
                print(f"[train] cannot resume from it: {error}; trying an older checkpoint", flush=True)
    train(config, report, rank, world_size)


def older_checkpoints(checkpoint: Checkpoint) -> list[str]:
    """The run's checkpoints older than `checkpoint`, newest first, as paths in its filesystem."""
    import fnmatch

    import pyarrow.fs as pafs

    folder, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(folder))
    return sorted((i.path for i in infos if i.type == pafs.FileType.Directory and fnmatch.fnmatchcase(i.base_name, CHECKPOINT_GLOB)
                   and i.base_name < name), reverse=True)


class SystemMetrics:
    """MLflow's own system monitors (CPU, memory; GPU when NVML answers), sampled in a thread every
    $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's default, 10) on rank 0's node, and
    averaged over each report's interval: reported with the evaluation as `system/<name>`, so a trial's
    MLflow run has them by step, through the same spool as everything else."""

    def __init__(self):
        import threading

        from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        self.monitors = [CPUMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except (ImportError, RuntimeError):  # no nvidia-ml-py, or no GPU: CPU and memory only
            pass
        self.interval = float(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10)
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._sample, name="system-metrics", daemon=True)

    def start(self) -> "SystemMetrics":
        self._collect()
        self.thread.start()
        return self

    def _collect(self) -> None:
        with self.lock:
            for monitor in self.monitors:
                monitor.collect_metrics()

    def _sample(self) -> None:
        while not self.stop.wait(self.interval):
            self._collect()

    def since_last(self) -> dict:
        """The mean of every sample since the previous call (one sample taken now)."""
        self._collect()
        with self.lock:
            out = {}
            for monitor in self.monitors:
                out.update({f"system/{k}": v for k, v in monitor.aggregate_metrics().items()})
                monitor.clear_metrics()
        return out


def build_trainer(config: Config, name: str, storage_path: str | Path, callbacks=()) -> TorchTrainer:
    # Ray Train's controller polls its workers every 2 s by default, and a run's start and end each wait
    # for a poll: 0.5 s took ~3 s off every sweep trial here (bench/sweep_overhead.py; Ray's floor for an
    # empty trial went from 12.7 to 9.3 s), for one cheap actor call more per second. Ray Train passes the
    # variable from the process that builds the trainer to its controller and workers; a user's value wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    settings = config.train
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})}
    return TorchTrainer(
        train_worker,
        train_loop_config=config.to_dict(),
        torch_config=OneMachineTorchConfig(),
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=resolve(storage_path),  # a folder or a URI (s3://...): Ray Train uploads the checkpoints there
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.keep_checkpoints or None),
            callbacks=list(callbacks),
        ),
    )


class OneMachineTorchConfig(TorchConfig):
    """Ray Train's torch setup, except when every worker runs on one machine: then the process group's
    rendezvous store (torch's TCPStore) listens on 127.0.0.1 only, and Gloo / NCCL connect over the
    loopback interface. torch binds a TCPStore to every interface whatever MASTER_ADDR says; it takes
    a socket already bound instead (`master_listen_fd`), which rank 0 makes. Across machines nothing
    changes (Ray's own setup, MASTER_ADDR the first worker's node)."""

    @property
    def backend_cls(self):
        return _OneMachineBackend


class _OneMachineBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        resources = worker_group.get_resources_per_worker()
        backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
        # Ray's own setup wherever ours would differ from it in more than the address: several nodes, TPUs,
        # another backend or init_method, Train V1's worker group.
        if (backend not in ("gloo", "nccl") or resources.get("TPU", 0) or backend_config.init_method != "env"
                or os.environ.get("RAY_TRAIN_V2_ENABLED") == "0" or not dist.is_available()
                or len(set(worker_group.execute(_node_id))) > 1):
            return super().on_start(worker_group, backend_config)
        port = worker_group.execute_single(0, _listen_on_loopback)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _join_on_loopback, backend=backend, port=port, world_rank=rank,
                                                   world_size=len(worker_group), timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


_LISTENER_FD: int | None = None  # rank 0's listening socket, handed to its TCPStore (which then owns it)


def _listen_on_loopback() -> int:
    import socket

    global _LISTENER_FD
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    _LISTENER_FD = listener.detach()
    return port


def _join_on_loopback(backend: str, port: int, world_rank: int, world_size: int, timeout_s: int) -> None:
    from datetime import timedelta

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ[name] = "127.0.0.1" if name == "MASTER_ADDR" else str(port)
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # a user's choice wins
        os.environ.setdefault(name, "lo")
    if backend == "nccl" and not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & set(os.environ):
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # as Ray's setup does: fail on a collective's timeout
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=world_rank == 0, timeout=timeout, wait_for_workers=False,
                          master_listen_fd=_LISTENER_FD if world_rank == 0 else None)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def check_resources(config: Config) -> None:
    """Fail in one line, instead of waiting forever, when the cluster cannot place the workers."""
    from trainers.common.errors import ConfigError

    settings = config.train
    cpus, gpus = ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0)
    need = settings.workers * settings.cpus_per_worker
    if need > cpus:
        raise ConfigError(f"train.workers x train.cpus_per_worker needs {need:g} CPUs; the Ray cluster has {cpus:g}")
    if settings.use_gpu and settings.workers > gpus:
        raise ConfigError(f"train.use_gpu: {settings.workers} workers need {settings.workers} GPUs; the Ray cluster has {gpus:g}")


PROBE_SECONDS = 5.0


def stopped_head() -> str | None:
    """The Ray head `ray start` last recorded on this machine (`ray_current_cluster` in Ray's temp
    folder), when nothing answers there any more; else None. `ray.init()` with no address connects to
    that record, and a stopped head's (`make stop`, then a sweep without `ray job submit`) it retries
    for ~15 minutes before failing. Not read when $RAY_ADDRESS says where to go (the preflight probes that)."""
    import socket

    from ray._private.utils import read_ray_address  # Ray's own reader of that record (ray 2.60, pinned)

    if os.environ.get("RAY_ADDRESS", "").strip():
        return None
    address = read_ray_address()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_SECONDS):
            return None
    except (OSError, ValueError):
        return address


def init_ray(**options) -> None:
    """Join the cluster of `ray start`, `ray job submit` or $RAY_ADDRESS, or start a local instance.
    A stopped head's record on this machine is removed (what `ray stop` does; a head ended by a signal
    leaves it), with a line saying so: besides ray.init, Ray's state API reads it, from inside a local
    instance too (Train's placement-group cleaner then waits out a 12 s timeout at the end of every trial)."""
    if ray.is_initialized():
        return
    stale = stopped_head()
    if stale:
        from ray._common.utils import get_ray_address_file

        record = get_ray_address_file(None)
        Path(record).unlink(missing_ok=True)
        print(f"[ray] the Ray head recorded on this machine ({stale}) does not answer (stopped?): its record {record} removed; "
              "starting a local Ray instance", flush=True)
    elif _joins_loopback_head():
        # A head started on 127.0.0.1 (`make services`): ray.init would swap 127.0.0.1 for this machine's
        # network address (ray._private.services.resolve_ip_for_localhost) and retry there for ~15
        # minutes. Ray keeps loopback when it is not in cluster mode, as that head was started
        # (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); read at call time, so setting it here is enough.
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local" if stale else None, **options)


def _joins_loopback_head() -> bool:
    """ray.init() with no address will join a head on a loopback address ($RAY_ADDRESS, else the record)."""
    from ray._private.utils import read_ray_address

    address = os.environ.get("RAY_ADDRESS", "").strip() or read_ray_address() or ""
    host = address.rpartition(":")[0].strip("[]")
    return "://" not in address and host in ("127.0.0.1", "localhost", "::1")


def run_training(config: Config, name: str = "train", storage_path: str | Path | None = None):
    """Fit one run; returns the Ray `Result`. Joins a running cluster or starts a local one."""
    init_ray(log_to_driver=True)
    check_resources(config)
    storage = storage_path or Path(config.train.output_dir) / "ray"
    try:
        return build_trainer(config, name, storage).fit()
    except ray.train.TrainingFailedError as error:
        raise TrainingError(root_message(error)) from None
