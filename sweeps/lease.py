"""One driver per sweep: a lease in the sweep's folder (`driver.lease`: host, pid, the process's start
time, a token, a beat counter and a heartbeat), written through trainers/common/storage.py, so a local
folder and a bucket behave alike.

A driver takes the lease before it writes anything of the sweep and gives it back when it ends. While
it runs, a thread renews the lease every `BEAT_S` seconds (the beat counter goes up by one). A second
driver (a second `--resume`, or `acpo select`) refuses in one line naming the first, unless the first
is gone:
- on the same machine (same host name, boot and process namespace), at once when its process no
  longer runs (a killed driver does not block the `--resume` that follows it), and never while it runs;
- from another machine, when its lease has not changed for `STALE_S` seconds (90: nine missed beats;
  each beat gives up after `BEAT_S`, so an outage of the store cannot hold a beat for longer).
  Staleness is judged on the reader's own monotonic clock, never against the heartbeat's time (the
  writer's clock): machines whose clocks disagree by minutes still judge alike. The reader remembers
  when it first saw the lease's exact content; one that sees it only once (the preflight, a second
  `--resume`) says it is waiting and watches it: a change means a live driver (refused), `STALE_S`
  without one a gone driver (taken over). What it saw is kept for the process, so the driver's own
  `acquire` after the preflight does not wait a second time.
A live driver on its machine is never displaced; from another machine, only after 90 s without a
beat (a store unreachable from the driver's machine for that long, or a driver stalled that long). Two drivers starting together both
write, wait `CONFIRM_S`, and read back: only the one whose token is there goes on. (That is safe while
each reads and writes within `CONFIRM_S` of the other; an object store offers no compare-and-swap
through pyarrow.) A driver that finds its lease taken over stops: `interrupt_main` ends what runs
outside Ray Tune, and the driver checks `lost` after the Tuner (Tune's own SIGINT handler only ends
the fit), before it touches the study, MLflow or the selection.
"""

from __future__ import annotations

import _thread
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from trainers.common import layout, storage
from trainers.common.errors import ConfigError, last_line

BEAT_S, STALE_S, CONFIRM_S = 10.0, 90.0, 1.0


class LeaseLost(ConfigError):
    """Another driver took the sweep over (this one stalled past STALE_S)."""


def process_start(pid: int) -> float | None:
    """When the process `pid` of this machine started (psutil), or None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def machine() -> str:
    """This machine as a lease names it: host name, boot and process namespace (containers that share
    a host name but not their processes are different machines)."""
    def proc(path: str) -> str:
        try:
            return Path(path).read_text().strip() if "boot_id" in path else str(os.stat(path).st_ino)
        except OSError:
            return ""
    return f"{socket.gethostname()}/{proc('/proc/sys/kernel/random/boot_id')}/{proc('/proc/self/ns/pid')}"


# lease file -> (its content, when this process first saw that content: its monotonic clock)
_seen: dict[str, tuple[str, float]] = {}


def unchanged_for(location: str, holder: dict) -> float:
    """Seconds this process has seen the lease `holder` at `location` unchanged, on its own clock (0 at first sight)."""
    content = json.dumps(holder, sort_keys=True)
    seen = _seen.get(location)
    if seen is None or seen[0] != content:
        seen = _seen[location] = (content, time.monotonic())
    return time.monotonic() - seen[1]


def gone_why(holder: dict, unchanged_s: float, stale_s: float) -> str | None:
    """Why the lease `holder` no longer holds (its driver ended, or its lease stopped changing), or None."""
    if holder.get("machine") == machine():
        started = process_start(int(holder.get("pid", -1)))
        if started is None or abs(started - float(holder.get("started", 0))) > 1:
            return f"its process {holder.get('pid')} on this machine has ended"
        return None  # it runs: never displaced, whatever its heartbeat
    if unchanged_s >= stale_s:
        return f"its lease has not changed for {unchanged_s:.0f} s of this machine's clock (stale after {stale_s:.0f} s)"
    return None


def describe(holder: dict) -> str:
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
    return f"driver pid {holder.get('pid')} on {holder.get('host')} (started {started}, beat {holder.get('beat', '?')})"


def read(directory: str) -> dict | None:
    """The lease's holder, or None when there is no lease (or it cannot be read: a write cut short)."""
    try:
        holder = json.loads(storage.read_text(layout.lease_file(directory)))
    except (FileNotFoundError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def watch(directory: str, holder: dict, stale_s: float, beat_s: float) -> tuple[dict | None, str | None]:
    """Another machine's lease, read until it changes (its driver lives: the new content, None) or has
    not changed for `stale_s` of this machine's clock (the holder and why it is gone); (None, None)
    when it is given back meanwhile."""
    location = layout.lease_file(directory)
    unchanged = unchanged_for(location, holder)
    print(f"[sweep] {directory} is held by {describe(holder)} from another machine: waiting up to "
          f"{max(0.0, stale_s - unchanged):.0f} s to see whether its lease still changes", flush=True)
    while (why := gone_why(holder, unchanged, stale_s)) is None:
        time.sleep(min(beat_s / 2, stale_s - unchanged))
        now = read(directory)
        if now is None or now != holder:
            return now, None
        unchanged = unchanged_for(location, holder)
    return holder, why


def judge(directory: str, what: str, stale_s: float, beat_s: float) -> tuple[dict | None, str | None]:
    """(None, None) when the sweep has no lease, (the lease, why it is gone) when its driver is gone;
    raises (one line) while a live driver holds it."""
    holder = read(directory)
    if holder is None:
        return None, None
    why = gone_why(holder, unchanged_for(layout.lease_file(directory), holder), stale_s)
    if why is None and holder.get("machine") != machine():
        holder, why = watch(directory, holder, stale_s, beat_s)
    if holder is not None and why is None:
        raise ConfigError(f"sweep.name: {directory} is being driven by {describe(holder)}; "
                          f"{what} refused (wait for it to end, or stop it: a stopped driver's lease is free at once on its "
                          f"machine, after {stale_s:.0f} s without a beat elsewhere)")
    return holder, why


def check_free(directory: str, what: str = "--resume", stale_s: float | None = None, beat_s: float | None = None) -> dict | None:
    """Refuses (one line) when a live driver holds the sweep; else returns the lease left by a gone
    driver, or None. Writes nothing (the preflight's check, and the first step of `Lease.acquire`);
    may wait up to `STALE_S` for another machine's lease (see the module)."""
    return judge(directory, what, STALE_S if stale_s is None else stale_s, BEAT_S if beat_s is None else beat_s)[0]


class Lease:
    """`with Lease(directory):` - the sweep's lease, held and renewed for the block (see the module)."""

    def __init__(self, directory: str, beat_s: float | None = None, stale_s: float | None = None, confirm_s: float = CONFIRM_S):
        self.directory, self.confirm_s = directory, confirm_s
        self.beat_s = BEAT_S if beat_s is None else beat_s
        self.stale_s = STALE_S if stale_s is None else stale_s
        self.beats = 0  # the beat counter: a reader on another machine sees it change, whatever the clocks say
        self.file = layout.lease_file(directory)
        self.mine = {"host": socket.gethostname(), "machine": machine(), "pid": os.getpid(), "started": process_start(os.getpid()) or time.time(),
                     "token": uuid.uuid4().hex}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.lost, self.taker = False, ""

    def _write(self) -> None:
        self.beats += 1
        storage.write_text(self.file, json.dumps({**self.mine, "beat": self.beats, "heartbeat": time.time()}) + "\n")

    def acquire(self) -> "Lease":
        holder, why = judge(self.directory, "this driver", self.stale_s, self.beat_s)
        if holder is not None:
            print(f"[sweep] taking over the sweep from {describe(holder)}: {why}", flush=True)
        self._write()
        time.sleep(self.confirm_s)
        holder = read(self.directory)
        if holder is None or holder.get("token") != self.mine["token"]:
            raise ConfigError(f"sweep.name: {self.directory} was taken by "
                              f"{describe(holder) if holder else 'another driver'} at the same moment; refused")
        self.thread = threading.Thread(target=self._beat, name="sweep-lease", daemon=True)
        self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stop.wait(self.beat_s):
            try:
                with storage.retrying_for(self.beat_s):  # a beat that cannot be written is the next beat's to try
                    self._renew()
            except Exception as error:  # noqa: BLE001 - an outage: the next beat tries again; STALE_S allows nine misses
                print(f"[sweep] could not renew the lease {self.file}: {last_line(error)[:160]}", file=sys.stderr, flush=True)
            if self.lost:
                return

    def _renew(self) -> None:
        holder = read(self.directory)
        if holder is not None and holder.get("token") != self.mine["token"]:
            self.lost = True
            self.taker = describe(holder)
            print(f"[sweep] the sweep's lease was taken over by {self.taker} (this driver stalled?): "
                  "stopping, so that two drivers never drive the same trials", file=sys.stderr, flush=True)
            _thread.interrupt_main()
            return
        self._write()

    def check(self) -> None:
        """Raises when the lease was taken over (see the module's docstring)."""
        if self.lost:
            raise LeaseLost(f"sweep.name: {self.directory} was taken over by {self.taker}; this driver stopped")

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.lost:
            return
        try:
            with storage.retrying_for(self.beat_s):
                holder = read(self.directory)
                if holder is not None and holder.get("token") == self.mine["token"]:
                    storage.delete(self.file)
        except Exception as error:  # noqa: BLE001 - a lease left behind is freed by its dead pid, or by not changing for STALE_S
            print(f"[sweep] could not remove the lease {self.file}: {last_line(error)[:160]}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
