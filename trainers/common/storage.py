"""Where a sweep's files live: a local folder or object storage, read and written one way.

A *location* is a local path or a URI that pyarrow's filesystem layer opens (`s3://bucket/prefix`,
`gs://bucket/prefix`, `file:///abs/path`, `hdfs://...`): the same layer Ray Train and Ray Tune
store through, so `sweep.storage_dir` means the same thing to Ray and to us. Credentials and the
endpoint come from the provider's standard settings (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for an S3-compatible server), as for
Ray and MLflow (boto3).

Writes are whole or not at all: a local file is written beside its place, flushed to the disk (fsync)
and renamed into it, and the rename is flushed too (the folder's fsync), so a crash or a power cut
leaves the old file or the new one, never a truncated one; an object store's PUT is atomic. A file
that is unreadable all the same (written by hand, or by another tool) is read by `read_json` as absent. Object stores have no append and no rename: callers that append (the
tracking spool, the Optuna journal) write one object per record instead.

An object store that does not answer (a network error, a 503 / SlowDown) is retried with back-off for
up to $ACPO_STORE_RETRY_S seconds (default 180), each read and write on its own; pyarrow's own three
quick attempts sit inside each try. Past that the error is raised, naming the location. Errors the
store answered (not found, access denied) are raised at once.

Part of the bottom layer (trainers/common/): the FID reference cache (eval), the latent cache
(trainers) and the sweep (sweeps) all read and write through it.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import functools
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs


def is_remote(location: str | Path) -> bool:
    """A URI other than file://: no local path reaches it."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def resolve(location: str | Path) -> str:
    """An absolute local path (file:// URIs become paths), or the URI without a trailing slash."""
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_remote(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    if not is_remote(location):
        return str(Path(location).joinpath(*parts))
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def name(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[0]


# What pyarrow's S3 / GCS layer says when the store did not answer, or asked to be called again later
# (its AWS error names, and an HTTP status of 500, 502, 503 or 504), never a key that happens to hold "503".
UNANSWERED = re.compile(r"AWS Error (NETWORK_CONNECTION|SERVICE_UNAVAILABLE|SLOW_DOWN|REQUEST_TIMEOUT|INTERNAL_FAILURE|THROTTLING)\b"
                        r"|curlCode: \d+|HTTP status (500|502|503|504)\b|Connection refused|Could not connect to server")


_RETRY_S: contextvars.ContextVar[float | None] = contextvars.ContextVar("retry_s", default=None)


def retry_seconds() -> float:
    """How long an unanswering object store is retried: `retrying_for`'s, else $ACPO_STORE_RETRY_S (180)."""
    override = _RETRY_S.get()
    if override is not None:
        return override
    text = os.environ.get("ACPO_STORE_RETRY_S", "180")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        from trainers.common.errors import ConfigError

        raise ConfigError(f"$ACPO_STORE_RETRY_S: expected a number of seconds >= 0, got {text!r}")
    return seconds


@contextlib.contextmanager
def retrying_for(seconds: float):
    """Within the block, an unanswering store is retried for `seconds` (0: not at all; a preflight's probe)."""
    token = _RETRY_S.set(seconds)
    try:
        yield
    finally:
        _RETRY_S.reset(token)


def unanswered(error: BaseException) -> bool:
    return isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and UNANSWERED.search(str(error)) is not None


def retried(operation):
    """`operation(location, ...)`, tried again with back-off while an object store does not answer
    (local locations: once). The first retry says so on stderr, once per call."""
    @functools.wraps(operation)
    def call(location, *args, **kwargs):
        if not any(isinstance(a, (str, Path)) and is_remote(a) for a in (location, *args)):  # upload(local, remote)
            return operation(location, *args, **kwargs)
        deadline, pause = time.monotonic() + retry_seconds(), 1.0
        while True:
            try:
                return operation(location, *args, **kwargs)
            except OSError as error:
                if not unanswered(error) or time.monotonic() + pause > deadline:
                    raise
                if pause == 1.0:
                    print(f"[storage] {location}: the object store does not answer ({str(error).splitlines()[0][:160]}); "
                          f"retrying for up to {retry_seconds():.0f} s", file=sys.stderr, flush=True)
                time.sleep(pause)
                pause = min(pause * 2, 15.0)
    return call


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem and the path within it."""
    if is_remote(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), resolve(location)


@retried
def _info(location) -> pafs.FileInfo:
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def exists(location: str | Path) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    return _info(location).type == pafs.FileType.File


def mtime(location: str | Path) -> float:
    """Seconds since the epoch (an object's upload time)."""
    info = _info(location)
    return info.mtime.timestamp() if info.mtime is not None else 0.0


@retried
def read_bytes(location: str | Path) -> bytes:
    if not is_remote(location):
        return Path(resolve(location)).read_bytes()
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {location}") from None


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


@retried
def write_bytes(location: str | Path, data: bytes) -> None:
    """Whole or not at all (concurrent readers never see half a file)."""
    if not is_remote(location):
        write_whole(Path(resolve(location)), lambda tmp: Path(tmp).write_bytes(data))
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode())


def write_whole(path: Path, write: Callable[[str], object]) -> None:
    """`write(tmp)` into a temporary file beside the local `path`, flushed to the disk, then renamed there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync(path.parent)


def sync(path: str | Path) -> None:
    """A local file's bytes, or a folder's entries (a rename into it), flushed to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: str | Path) -> None:
    """Every file and folder under a local `folder`, and the folder itself, flushed to the disk: before
    the folder is renamed into place, so the rename never publishes files still in the page cache."""
    for root, folders, files in os.walk(folder):
        for entry in files:
            sync(Path(root) / entry)
        sync(root)


def publish_folder(tmp: Path, path: Path) -> None:
    """A local folder written aside (`tmp`, beside `path`) flushed to the disk and renamed into place, the
    rename flushed too; a folder already at `path` (the same step written again) is replaced, never merged."""
    import shutil

    sync_tree(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    sync(path.parent)


def read_json(location: str | Path, what: str):
    """The JSON value in `location`, or None when there is none or it cannot be read (cut short, or not
    JSON), saying so in one line on stderr: the caller computes it again."""
    import json

    try:
        return json.loads(read_bytes(location).decode())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError included
        print(f"[storage] {location}: unreadable as {what} ({type(error).__name__}: cut short?); computed again",
              file=sys.stderr, flush=True)
        return None


@retried
def listdir(location: str | Path) -> list[str]:
    """Names of the entries directly under `location`, sorted ([] when there is none)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


@retried
def glob(location: str | Path, pattern: str) -> list[str]:
    """Locations of the files under `location` whose relative path matches `pattern` segment by
    segment (`trials/*/step_*/metrics.json`), sorted. One listing of the pattern's fixed prefix."""
    parts = pattern.split("/")
    fixed = 0
    while fixed < len(parts) - 1 and not any(c in parts[fixed] for c in "*?["):
        fixed += 1
    root = join(location, *parts[:fixed]) if fixed else str(location)
    rest = parts[fixed:]
    fs, path = filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=len(rest) > 1, allow_not_found=True))
    found = []
    for info in infos:
        relative = info.path[len(path.rstrip("/")) + 1:].split("/")
        if info.type == pafs.FileType.File and len(relative) == len(rest) and all(map(fnmatch.fnmatchcase, relative, rest)):
            found.append(join(root, *relative))
    return sorted(found)


def makedirs(location: str | Path) -> None:
    """A local folder is made; an object store has no folders to make."""
    if not is_remote(location):
        Path(resolve(location)).mkdir(parents=True, exist_ok=True)


@retried
def move(source: str | Path, destination: str | Path) -> None:
    fs, path = filesystem(source)
    fs.move(path, filesystem(destination)[1])


@retried
def delete(location: str | Path) -> None:
    """A file or a whole folder; nothing when it is not there."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@retried
def upload(local: str | Path, location: str | Path) -> None:
    """A local file or folder copied to `location` (for a folder: its files under it)."""
    fs, path = filesystem(location)
    if Path(local).is_dir():
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    else:
        write_bytes(location, Path(local).read_bytes())


@retried
def _download(location: str, target: Path, folder: bool) -> None:
    """`location` copied to the local `target` (a file, or a folder's files), whole again when retried."""
    shutil.rmtree(target, ignore_errors=True)
    if folder:
        fs, path = filesystem(location)
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    else:
        target.write_bytes(read_bytes(location))


@contextlib.contextmanager
def local_copy(location: str | Path):
    """A local path holding what `location` holds (a file or a folder): the path itself when local,
    else a download into a temporary folder, deleted afterwards (its base name kept)."""
    if not is_remote(location):
        yield Path(resolve(location))
        return
    info = _info(location)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"not found: {location}")
    scratch = Path(tempfile.mkdtemp(prefix="acpo-download."))
    target = scratch / name(location)
    try:
        _download(location, target, info.type == pafs.FileType.Directory)
        yield target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
