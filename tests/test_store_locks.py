"""The atomic lock file (FEATURE_STORE_LOCK=file) between real processes, as runs on several hosts would take it.

Another host is simulated by a process whose `socket.gethostname` answers another name: the only way the
lock tells hosts apart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feature_cache.locks import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]

# Takes the store lock, says "held" (or the one error line), holds it until stdin closes or HOLD_S passes.
_HOLDER = """
import os, socket, sys, time
host = os.environ.get("FAKE_HOST")
if host:
    socket.gethostname = lambda: host
from feature_cache.store import StoreLockedError, store_lock
try:
    with store_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(os.environ.get("HOLD_S", "0"))) if os.environ.get("HOLD_S") else sys.stdin.read()
except StoreLockedError as error:
    print(error, flush=True)
    sys.exit(3)
"""


def _holder(store: Path, stale_s: float = 600, host: str = "", hold_s: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEATURE_STORE_LOCK": "file",
           "FEATURE_STORE_LOCK_STALE_S": str(stale_s), "FAKE_HOST": host, "HOLD_S": hold_s}
    return subprocess.Popen([sys.executable, "-c", _HOLDER, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _started(process: subprocess.Popen) -> str:
    return process.stdout.readline().strip()


def test_second_process_is_refused_while_held_and_gets_it_after_release(tmp_path):
    """Catches a lock file that is not exclusive (both "held"), one not deleted on release (the next run
    refused forever), and a refusal that does not name the holder's pid and host."""
    store = tmp_path / "s.zarr"
    first = _holder(store)
    assert _started(first) == "held"
    record = json.loads((store / LOCK_FILE).read_text())
    assert record["pid"] == first.pid and record["host"]
    second = _holder(store)
    assert second.wait(timeout=60) == 3
    line = second.stdout.read().strip()
    assert line.startswith(f"feature store {store} is being created/grown by another run "
                           f"(lock held by pid {first.pid} on host {record['host']}, heartbeat "), line
    first.communicate("")  # release
    assert first.returncode == 0 and not (store / LOCK_FILE).exists()
    third = _holder(store)
    assert _started(third) == "held"
    third.communicate("")


def test_kill_9_on_the_same_host_is_stale_at_once(tmp_path):
    """Catches a lock left by a killed run blocking every rerun on its host (pid-liveness rule missing)."""
    store = tmp_path / "s.zarr"
    first = _holder(store)
    assert _started(first) == "held"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (store / LOCK_FILE).exists()
    second = _holder(store)
    assert _started(second) == "held"
    assert json.loads((store / LOCK_FILE).read_text())["pid"] == second.pid
    second.communicate("")


def test_another_hosts_lock_is_kept_while_it_beats_and_taken_over_when_it_stops(tmp_path):
    """Catches a live holder on another host losing its lock (no heartbeat: its mtime ages past stale_after),
    and a dead host's lock never being taken over (the age rule missing)."""
    store = tmp_path / "s.zarr"
    remote = _holder(store, stale_s=1.0, host="node017")
    assert _started(remote) == "held"
    time.sleep(2.5)  # > stale_after: only the heartbeat keeps the mtime fresh
    local = _holder(store, stale_s=1.0)
    assert local.wait(timeout=60) == 3 and f"(lock held by pid {remote.pid} on host node017" in local.stdout.read()
    remote.send_signal(signal.SIGKILL)  # the remote host dies: its pid cannot be checked from here
    remote.wait()
    time.sleep(1.5)
    taker = _holder(store, stale_s=1.0)
    assert _started(taker) == "held"
    taker.communicate("")


def test_contenders_for_a_stale_lock_one_wins(tmp_path):
    """Four processes find the same stale lock at once. Catches two of them breaking it and both holding
    the store (the break must be serialised)."""
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / LOCK_FILE).write_text(json.dumps({"host": "deadnode", "pid": 1, "since": 0}))
    os.utime(store / LOCK_FILE, (0, 0))
    contenders = [_holder(store, stale_s=30, hold_s="3") for _ in range(4)]
    outputs = [c.communicate(timeout=60)[0].strip() for c in contenders]
    assert sorted(c.returncode for c in contenders) == [0, 3, 3, 3], outputs
    assert all("lock held by" in out for c, out in zip(contenders, outputs) if c.returncode == 3), outputs


@pytest.mark.parametrize(("name", "value", "line"), [
    ("FEATURE_STORE_LOCK", "nfs", "FEATURE_STORE_LOCK='nfs': expected 'flock' (default) or 'file'"),
    ("FEATURE_STORE_LOCK_STALE_S", "soon", "FEATURE_STORE_LOCK_STALE_S='soon': expected a positive number of seconds"),
])
def test_bad_setting_is_one_line(tmp_path, monkeypatch, name, value, line):
    """Catches a typo in the lock setting silently falling back to flock (the unsafe lock on that filesystem)."""
    from feature_cache.store import store_lock
    monkeypatch.setenv("FEATURE_STORE_LOCK", "file")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{line}$".replace("(", r"\(").replace(")", r"\)")):
        with store_lock(tmp_path / "s.zarr"):
            pass
