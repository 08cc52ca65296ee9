"""The embedded Redis: shared by its holders, gone when the last one dies, even by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from workers.embedded_redis import EmbeddedRedis

HOLDER = """
import sys, time
from pathlib import Path
from workers.embedded_redis import EmbeddedRedis
EmbeddedRedis(Path(sys.argv[1])).attach()
print("attached", flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _watchdogs(var_dir: Path) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "-m workers.embedded_redis" in cmdline and str(var_dir) in cmdline:
                found.add(int(entry.name))
    return found


def _holder(var_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(var_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "attached"
    return process


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    return {pid for pid in pids if _alive(pid)}


def test_embedded_redis_exits_when_its_last_holder_is_sigkilled(tmp_path: Path):
    """Given two processes holding one embedded Redis, When the one that started it is SIGKILLed,
    Then the server keeps serving the other; When that one is SIGKILLed too (no atexit runs),
    Then redis-server and its watchdog exit within seconds.
    """
    var_dir = tmp_path.resolve()
    first = _holder(var_dir)
    second = _holder(var_dir)
    server_pid = int((var_dir / "redis" / "redis.pid").read_text())
    watchdogs = _watchdogs(var_dir)
    client = redis.Redis(unix_socket_path=str(EmbeddedRedis(var_dir).socket), socket_timeout=5)
    try:
        assert len(watchdogs) == 1
        assert {int(pid) for pid in client.smembers("sally:embedded:holders")} == {first.pid, second.pid}

        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(1.5)  # three watchdog rounds
        assert _alive(server_pid) and client.ping()

        second.send_signal(signal.SIGKILL)
        second.wait()
        assert _wait_gone({server_pid, *watchdogs}, 10) == set()
        assert not (var_dir / "redis" / "redis.pid").exists(), "Redis shut down cleanly (removes its pid file)"
    finally:
        client.close()
        for process in (first, second):
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
        for pid in {server_pid, *watchdogs}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_clean_detach_stops_the_server_and_its_watchdog(tmp_path: Path):
    """Given one process holding the embedded Redis, When it detaches, Then the server and the watchdog exit."""
    var_dir = tmp_path.resolve()
    server = EmbeddedRedis(var_dir)
    server.attach()
    server_pid = int((var_dir / "redis" / "redis.pid").read_text())
    watchdogs = _watchdogs(var_dir)
    assert len(watchdogs) == 1

    server.detach()

    assert _wait_gone({server_pid, *watchdogs}, 10) == set()
