"""The atomic lock file: a store lock for shared filesystems where `fcntl.flock` cannot be trusted between hosts.

`store_lock` uses `flock` on `STORE/.lock` by default; it holds between hosts on local disks (one host), Lustre
mounted with `-o flock`, NFS v4 (the kernel maps flock to NFS byte-range locks) and GPFS. It does not on Lustre
mounted with `localflock` or without flock (then only one host sees the lock, or flock fails), NFS v3 without
lockd, and some FUSE filesystems. There, set FEATURE_STORE_LOCK=file in every job that touches the store:

- the lock is `STORE/.lock.file`, created with O_CREAT|O_EXCL (atomic on all of the above, NFS v3 included
  since Linux 2.6.5), holding {"host", "pid", "since"}; releasing it deletes it;
- the holder touches it every `stale_after / 4` seconds (a heartbeat thread), so its mtime says it is alive;
- a lock file is stale when its host is this host and its pid is dead, or when its mtime is older than
  `stale_after` seconds (FEATURE_STORE_LOCK_STALE_S, default 600: more than the clocks of the hosts may
  differ, and more than a filesystem stall may last). A stale lock is taken over under a short-lived
  `STORE/.lock.break` (itself O_EXCL), so two contenders cannot both break and both win.

All runs on one store must use the same mode: the two modes do not see each other's lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_FILE", "LOCK_MODE_ENV", "STALE_AFTER_ENV", "LockHeld", "lock_file", "lock_mode"]

LOCK_FILE = ".lock.file"
LOCK_MODE_ENV = "FEATURE_STORE_LOCK"  # flock (default) | file
STALE_AFTER_ENV = "FEATURE_STORE_LOCK_STALE_S"
_BREAK = ".lock.break"


class LockHeld(Exception):
    """The lock file is held by a live holder; `holder` says who ("pid P on host H")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def lock_mode() -> str:
    """The store lock selected by FEATURE_STORE_LOCK; an unknown value is one clear error."""
    mode = os.environ.get(LOCK_MODE_ENV, "flock")
    if mode not in ("flock", "file"):
        raise ValueError(f"{LOCK_MODE_ENV}={mode!r}: expected 'flock' (default) or 'file'")
    return mode


def _stale_after() -> float:
    value = os.environ.get(STALE_AFTER_ENV, "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"{STALE_AFTER_ENV}={value!r}: expected a positive number of seconds")
    return seconds


def _create(path: Path) -> bool:
    """Atomically create `path` with this process's identity; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _holder(path: Path) -> tuple[dict, float] | None:
    """The lock file's record and mtime, or None if it is gone; a half-written record reads as {}."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = {}
    return (record if isinstance(record, dict) else {}), mtime


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale(record: dict, mtime: float, stale_after: float) -> bool:
    """This host's dead pid, or no heartbeat for `stale_after` seconds (also covers a reused pid)."""
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) \
            and not _pid_alive(record["pid"]):
        return True
    return time.time() - mtime > stale_after


def _describe(record: dict, mtime: float, stale_after: float) -> str:
    """Who holds it and when it last beat: a lock of a dead job on another host is taken over after
    `stale_after` seconds, or at once by deleting the file when no job uses the store."""
    return (f"pid {record.get('pid', 'unknown')} on host {record.get('host', 'unknown')}, heartbeat "
            f"{max(0.0, time.time() - mtime):.0f} s ago; stale after {stale_after:.0f} s "
            f"({STALE_AFTER_ENV}), or delete {LOCK_FILE} if no job uses the store")


def _break_stale(directory: Path, stale_after: float) -> bool:
    """Take over a stale lock file; True if this process now holds it. Serialised by the O_EXCL break file."""
    breaker = directory / _BREAK
    if not _create(breaker):
        seen = _holder(breaker)
        if seen is not None and _stale(*seen, min(stale_after, 60.0)):
            breaker.unlink(missing_ok=True)  # a breaker that died between its steps; the next attempt retries
        return False
    try:
        seen = _holder(directory / LOCK_FILE)  # re-read under the break file: it may have been replaced meanwhile
        if seen is not None and not _stale(*seen, stale_after):
            return False
        (directory / LOCK_FILE).unlink(missing_ok=True)
        return _create(directory / LOCK_FILE)
    finally:
        breaker.unlink(missing_ok=True)


@contextmanager
def lock_file(directory: Path) -> Iterator[None]:
    """Hold `directory/.lock.file` (see the module docstring), or raise `LockHeld` naming the live holder."""
    stale_after = _stale_after()
    path = directory / LOCK_FILE
    if not _create(path):
        seen = _holder(path)
        if seen is not None and not _stale(*seen, stale_after):
            raise LockHeld(_describe(*seen, stale_after))
        if not (_create(path) if seen is None else _break_stale(directory, stale_after)):
            seen = _holder(path)
            raise LockHeld(_describe(*seen, stale_after) if seen else "a run that just took and released it")
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(stale_after / 4):
            try:
                os.utime(path)
            except FileNotFoundError:
                return

    beat = threading.Thread(target=heartbeat, name="store-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        seen = _holder(path)
        if seen is not None and (seen[0].get("host"), seen[0].get("pid")) == (socket.gethostname(), os.getpid()):
            path.unlink()  # never another run's lock (one that judged this one stale during a long stall)
