"""Preflight: what a run needs, checked before Ray starts and before anything is written, so that bad
input ends in one line naming the field or file (exit 2) instead of a sweep whose every trial fails.

    check_inputs(config)        every file the config names opened with the loader the run uses: the
                                base model (and t ranges against its scheduler, by building the
                                objective), the training images, the reference set, the quality
                                models and the feature extractor; the latent cache's folder is writable
    check_services(uri)         the MLflow server and $RAY_ADDRESS answer within a few seconds
    check_storage_folder(dir)   the storage folder is writable, and writable by its owner only
    check_object_storage(uri)   object storage (s3://...) takes and gives back a small object

Types and ranges are pydantic's (trainers/config.py) and the registry's; this is what they cannot
see without opening files or sockets. Hub ids are not fetched here (offline they would fail, online
the run fetches them): they are listed as not checked.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from trainers.common.credentials import redact
from trainers.common.errors import ConfigError, last_line
from trainers.config import Config

PROBE_SECONDS = 5.0


def _is_local(path: str) -> bool:
    return bool(path) and (Path(path).is_absolute() or path.startswith((".", "~")) or Path(path).exists())


def _checked(field: str, load, *args):
    """`load(*args)`, with any failure as a one-line ConfigError naming the field (the loaders name their file)."""
    try:
        return load(*args)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the loader raised, this input is what broke it
        raise ConfigError(f"{field}: {last_line(error)}") from None


def check_inputs(config: Config) -> list[str]:
    """Open every file the config names; returns what was left unchecked (hub ids), one line each."""
    from eval.fidelity import _extractor
    from eval.quality import load_quality_model
    from trainers.image_sets import reference_images, training_set
    from trainers.models import load_base_model

    unchecked = []
    base = None
    if _is_local(config.model.base):
        base = _checked("model.base", load_base_model, config.model.base)
    else:
        unchecked.append(f"model.base: {config.model.base} (hub)")
    data = config.data
    if data.source == "folder" or (data.source == "hf" and _is_local(data.path)):
        dataset = _checked(f"data.path ({data.source})", training_set, data)
        if len(dataset) == 0:
            raise ConfigError(f"data.path: {data.path} holds no images")
        _checked("data.path", dataset.__getitem__, 0)
    elif data.source == "hf":
        unchecked.append(f"data.path: {data.path} (hub)")
    reference = config.eval.reference
    if reference.startswith("hf:") and not _is_local(reference[3:].split(":")[0]):
        unchecked.append(f"eval.reference: {reference} (hub)")
    else:
        _checked("eval.reference", reference_images, reference, data)
    for name, spec in config.eval.quality_specs().items():
        option = f"eval.extra_quality.{name}" if name in config.eval.extra_quality else f"eval.{name}"
        if isinstance(spec, dict):
            _checked(f"{option}.weights", load_quality_model, spec)
        else:
            unchecked.append(f"{option}: {spec} (pyiqa downloads its weights)")
    if config.eval.feature_extractor_weights:
        _checked("eval.feature_extractor_weights", _extractor, config.eval.feature_extractor, config.eval.feature_extractor_weights, False)
    else:
        unchecked.append(f"eval.feature_extractor: {config.eval.feature_extractor} (torch-fidelity downloads its weights)")
    if data.cache_latents and (base is None or base.latent):  # the worker writes the encoded training set there
        from trainers.data import DEFAULT_LATENT_CACHE

        check_writable("data.cache_dir", Path(data.cache_dir or DEFAULT_LATENT_CACHE))
    if base is not None:
        from trainers.loop import check_against_model

        check_against_model(config, base)
        check_objective(config, base)
    else:
        unchecked.append("objective: built when the run starts (it needs the base model)")
    return unchecked


def check_writable(field: str, folder: Path) -> None:
    """`folder`, or while it does not exist its nearest existing parent, is a folder this user can
    write in (probed with a temporary file; nothing is created)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(f"{field}: cannot write in {existing} ({error.strerror or last_line(error)})") from None


def check_objective(config: Config, base) -> None:
    """Build the objective as the trainer does: term weights files load, t ranges fit the scheduler."""
    from objectives.registry import build_objective
    from trainers.common.errors import ObjectiveError
    from trainers.loop import objective_env

    try:
        build_objective(config.objective, objective_env(config, base, "cpu"))
    except ObjectiveError as error:
        raise ConfigError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - a term's file or setting that only building reveals
        raise ConfigError(f"objective: {last_line(error)}") from None


def check_tracking(uri: str, field: str) -> None:
    """An http(s) tracking URI answers MLflow's /health within a few seconds (other stores: nothing to probe)."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        # /health needs no login; urllib takes no user-info in a URL (MLflow's client sends it as basic auth)
        probe = urlparse(uri)._replace(netloc=urlparse(uri).netloc.rpartition("@")[2]).geturl()
        with urllib.request.urlopen(f"{probe.rstrip('/')}/health", timeout=PROBE_SECONDS) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except OSError as error:
        reason = last_line(getattr(error, "reason", error))
    raise ConfigError(f"{field}: no MLflow server answers at {redact(uri)} within {PROBE_SECONDS:g} s ({reason})")


def check_ray_address() -> None:
    """$RAY_ADDRESS, when it names a host and port, has something listening there (ray.init would
    wait forever). `auto`, `local` and an unset address are ray.init's to resolve."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port or 6379
    except ValueError:
        raise ConfigError(f"$RAY_ADDRESS: expected host:port, got {address!r}") from None
    if not host:
        raise ConfigError(f"$RAY_ADDRESS: expected host:port, got {address!r}")
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return
    except OSError as error:
        raise ConfigError(f"$RAY_ADDRESS: nothing answers at {host}:{port} within {PROBE_SECONDS:g} s ({last_line(error)}); "
                          "start the cluster (ray start --head) or unset RAY_ADDRESS to run on a local Ray") from None


def check_services(tracking_uri: str, field: str) -> None:
    check_tracking(tracking_uri, field)
    check_ray_address()


def check_storage_folder(folder: Path, field: str) -> None:
    """`folder` (or, while it does not exist, its nearest existing parent) is a folder this user can
    write to, and no one else can: whoever can write there can change the checkpoints and figures
    the champion is chosen from (nothing there is unpickled: sweeps/search.py)."""
    check_writable(field, folder)
    for path in (p for p in (folder.parent, folder) if p.exists()):
        mode = path.stat()
        if mode.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or mode.st_uid != os.geteuid():
            raise ConfigError(f"{field}: {path} is writable by others (mode {stat.filemode(mode.st_mode)}, owner uid {mode.st_uid}); "
                              "the sweep's checkpoints and records would be theirs to change: use a folder only you can write (chmod go-w)")


def check_object_storage(location: str, field: str) -> None:
    """A probe object written under `location` and deleted: the bucket exists, the credentials let us
    write, the endpoint answers, now (no retries: one line at once). A bucket is the user's to make,
    and to lock down: whoever can write there can change the sweep's records and checkpoints."""
    import uuid

    from trainers.common import storage

    storage.retry_seconds()  # a bad $ACPO_STORE_RETRY_S fails here, in one line, not at the first outage
    probe = storage.join(location, f".acpo-probe-{uuid.uuid4().hex[:8]}")
    try:
        with storage.retrying_for(0):
            storage.write_text(probe, "probe")
            storage.delete(probe)
    except Exception as error:  # noqa: BLE001 - whatever pyarrow says, this store is not usable
        raise ConfigError(f"{field}: cannot write to {location} ({last_line(error)[:300]}); check the bucket, "
                          "the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the endpoint (AWS_ENDPOINT_URL)") from None
