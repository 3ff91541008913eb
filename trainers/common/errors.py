"""Every error a user can cause or meet, as one line, and the one place entry points report them.

Importing this module imports nothing else of the project and no heavy library: `report_error`
matches exception types defined here, so a typo in `acpo eval` does not pay for Ray or MLflow.
"""

from __future__ import annotations

import errno
import sys

from trainers.common.credentials import redact


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


class ObjectiveError(ValueError):
    """A bad objective config; the message names the field (`objective.nr_iqa.x0.t_range: ...`)."""


class OptionError(ValueError):
    """A bad option of one term or model spec; `option` is its name (`x0.t_range`, `metric.weights`)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


class UnreadableFileError(ValueError):
    """A file that exists but cannot be read as what it should be (corrupt, truncated, another format)."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint folder that cannot be restored or loaded (a file missing, corrupt or of the wrong shapes)."""


class TrainingError(RuntimeError):
    """A training run failed; the message is the worker's own one-line error."""


class TrackingError(RuntimeError):
    """MLflow could not be reached for a step that needs it; the message says what is safe on disk."""


class SelectionError(RuntimeError):
    """The selection of a finished sweep could not be made; the message names what is missing."""


USER_ERRORS = (ConfigError, ObjectiveError, OptionError, FileNotFoundError, NotADirectoryError, UnreadableFileError,
               UnreadableCheckpointError, FloatingPointError, TrainingError, TrackingError, SelectionError)


def last_line(error: BaseException, with_type: bool = False) -> str:
    """An exception as one line: its message's last non-empty line (where Python, pyarrow and most
    libraries put the reason), or its type's name when it has no message. Passwords in URIs are
    redacted: the line goes to output, records and MLflow."""
    lines = [line for line in redact(str(error)).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[-1]}" if with_type else lines[-1]


def root_message(error: BaseException) -> str:
    """The first worker's own error as one line (`FloatingPointError: non-finite loss at step 3 ...`),
    unwrapped from Tune's and Ray's wrappers (RayTaskError.cause, Train's worker and controller
    failures, in any order) by their attributes, so this needs no Ray import."""
    cause = error
    for _ in range(10):
        failures = getattr(cause, "worker_failures", None) or {}
        inner = next(iter(failures.values()), None) or getattr(cause, "controller_failure", None) or getattr(cause, "cause", None)
        if inner is None or inner is cause:
            break
        cause = inner
    last = last_line(cause)
    return last if ":" in last else f"{type(cause).__name__}: {last}"


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and (error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
                                           or "No space left on device" in str(error))


def report_error(error: BaseException) -> int:
    """A user's error (bad config, missing file, a run that failed in a known way) as one line on
    stderr, exit status 2; anything else is a bug and keeps its traceback. Every entry point ends here."""
    if is_disk_full(error):
        # The storage filled up (or went read-only) under the sweep: what is written stays consistent
        # (checkpoints and records are written aside and renamed); free space, then --resume.
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print(f"acpo: error: the storage folder cannot be written{redact(where)}: {last_line(error)[:200]}; "
              "free space (or make it writable) and --resume", file=sys.stderr)
        return 2
    if not isinstance(error, USER_ERRORS):
        raise error
    print(f"acpo: error: {redact(str(error))}", file=sys.stderr)
    return 2
