"""`make run` on a clean copy of the repository, as a new user runs it (CONTRACT.md "Two commands").

Slow (it creates a virtualenv and installs the package; pip's cache keeps that
short on a machine that installed before). Skip it only on purpose, with
SALLY_SKIP_MAKE_RUN=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.fakes.ports import free_port

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 240  # `make run` creates .venv and pip-installs before it serves
STOP_TIMEOUT = 30
# What a clean checkout never holds, for a copy made without git.
NOT_IN_A_CHECKOUT = shutil.ignore_patterns(".git", ".venv", "var", "__pycache__", "*.egg-info", ".pytest_cache", "build")

pytestmark = pytest.mark.skipif(
    os.environ.get("SALLY_SKIP_MAKE_RUN") == "1", reason="SALLY_SKIP_MAKE_RUN=1: `make run` end-to-end test skipped"
)


def copy_checkout(destination: Path) -> None:
    """The files a fresh clone would have: tracked and not-ignored ones (in CI's clone, exactly HEAD)."""
    if (REPO / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True, capture_output=True,
        ).stdout.decode()
        for name in filter(None, listed.split("\0")):
            source = REPO / name
            if source.is_file():  # a tracked file deleted in the work tree is gone from the next commit too
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination / name)
    else:
        shutil.copytree(REPO, destination, ignore=NOT_IN_A_CHECKOUT, dirs_exist_ok=True)


def fresh_machine_env(var_dir: Path, port: int) -> dict[str, str]:
    """This environment minus what a fresh machine lacks: no Redis/Postgres URLs, no active venv, no make state."""
    env = dict(os.environ)
    for name in (
        "REDIS_URL", "DATABASE_URL", "TEST_DATABASE_URL", "SALLY_ADMIN_TOKEN", "SALLY_REDIS_NAMESPACE",
        "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "PIP_NO_CACHE_DIR",
    ):
        env.pop(name, None)
    if sys.prefix != sys.base_prefix:  # the test runs in a venv; `make run` must not find its python first
        venv_bin = str(Path(sys.prefix) / "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(SALLY_VAR_DIR=str(var_dir), PORT=str(port), PUBLIC_BASE_URL=f"http://127.0.0.1:{port}")
    return env


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def descendants(root: int) -> set[int]:
    """Every live process below `root` (children may sit in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        parent = _ppid(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def processes_naming(text: str) -> set[int]:
    """Processes whose command line mentions `text` (the embedded redis-server names its socket there)."""
    found = set()
    for pid in all_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid != os.getpid():
            found.add(pid)
    return found


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def banner_value(output: str, label: str) -> str | None:
    match = re.search(rf"^\s*{re.escape(label)}:\s+(\S+)\s*$", output, re.MULTILINE)
    return match.group(1) if match else None


class MakeRun:
    """`make run` in its own session, its output in a file."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.log_path = workdir / "make-run.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            ["make", "run"], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_serving(self, base_url: str) -> str:
        """Until /healthz answers 200 and the banner is printed; returns the output so far."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"`make run` exited with {self.process.returncode} before serving")
            output = self.output()
            if banner_value(output, "Demo Token"):
                try:
                    if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                        return self.output()
                except httpx.TransportError:
                    pass
            time.sleep(0.5)
        pytest.fail(f"`make run` did not serve /healthz within {START_TIMEOUT} s")

    def kill_everything(self, extra: set[int]) -> None:
        """Last resort after a failure: nothing this test started may outlive it."""
        for pid in descendants(self.process.pid) | extra | {self.process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self._log.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sally-make-run-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_make_run_serves_a_new_tenant_and_ctrl_c_stops_everything(workdir: Path) -> None:
    """Given a clean checkout and no Redis/Postgres, when `make run` starts, then an IdP can provision
    into a tenant made with `sally-scim tenant create`, the admin sees the user, and SIGINT stops it all."""
    assert shutil.which("make"), "`make` is needed: the README's quick start is `make run`"
    copy_checkout(workdir)
    var_dir = workdir / "var"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = fresh_machine_env(var_dir, port)

    started = time.monotonic()
    run = MakeRun(workdir, env)
    started_here: set[int] = set()
    try:
        output = run.wait_until_serving(base)
        print(f"`make run` served after {time.monotonic() - started:.1f} s")

        # Then: the banner has the admin token and a demo tenant that works.
        admin_token = banner_value(output, "Admin token")
        demo_url = banner_value(output, "Demo Tenant URL")
        demo_token = banner_value(output, "Demo Token")
        admin_page = banner_value(output, "Admin page")
        assert admin_token and demo_url and demo_token and admin_page, output
        # The admin page's address answers with the sign-in form (GET / never 404s).
        assert admin_page == f"{base}/"
        page = httpx.get(admin_page, timeout=10)
        assert page.status_code == 200 and 'action="/login"' in page.text, page.text[:500]
        assert re.fullmatch(re.escape(base) + r"/scim/v2/[^/]+", demo_url), demo_url
        demo = httpx.get(f"{demo_url}/Users", headers={"Authorization": f"Bearer {demo_token}"}, timeout=10)
        assert demo.status_code == 200, demo.text

        # When: an admin creates a tenant for Okta from the command line.
        created = subprocess.run(
            [str(workdir / ".venv/bin/sally-scim"), "tenant", "create", "Acme", "--provider", "okta", "--json"],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=60,
        )
        assert created.returncode == 0, created.stderr
        lines = created.stdout.strip().splitlines()
        assert len(lines) == 1, created.stdout
        tenant = json.loads(lines[0])
        assert set(tenant) == {"tenant_id", "tenant_url", "token"}
        assert tenant["tenant_url"] == f"{base}/scim/v2/{tenant['tenant_id']}"

        # And: the IdP provisions a user with that Tenant URL and Token.
        user_name = "ada.lovelace@acme.example"
        with httpx.Client(
            base_url=tenant["tenant_url"],
            headers={"Authorization": f"Bearer {tenant['token']}", "Content-Type": "application/scim+json"},
            timeout=10,
        ) as idp:
            posted = idp.post("/Users", json={
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": user_name,
                "externalId": "00u1ada",
                "name": {"givenName": "Ada", "familyName": "Lovelace"},
                "emails": [{"value": user_name, "type": "work", "primary": True}],
                "active": True,
            })
            assert posted.status_code == 201, posted.text
            user_id = posted.json()["id"]
            assert posted.headers["location"] == f"{tenant['tenant_url']}/Users/{user_id}"

            fetched = idp.get(f"/Users/{user_id}")
            assert fetched.status_code == 200, fetched.text
            assert fetched.json()["userName"] == user_name
            assert fetched.json()["active"] is True

            found = idp.get("/Users", params={"filter": f'userName eq "{user_name}"'})
            assert found.status_code == 200, found.text
            assert found.json()["totalResults"] == 1
            assert [r["id"] for r in found.json()["Resources"]] == [user_id]

        # Another tenant's token opens nothing here.
        foreign = httpx.get(f"{tenant['tenant_url']}/Users/{user_id}",
                            headers={"Authorization": f"Bearer {demo_token}"}, timeout=10)
        assert foreign.status_code == 401, foreign.text

        # Then: the admin API lists the user under the new tenant.
        admin_users = httpx.get(f"{base}/admin/api/tenants/{tenant['tenant_id']}/users",
                                headers={"Authorization": f"Bearer {admin_token}"}, timeout=10)
        assert admin_users.status_code == 200, admin_users.text
        assert [(u["id"], u["userName"], u["email"]) for u in admin_users.json()] == [(user_id, user_name, user_name)]
        assert httpx.get(f"{base}/admin/api/tenants/{tenant['tenant_id']}/users", timeout=10).status_code == 401

        # And: the worker that `make run` started applies what the IdP sent (CONTRACT.md "Timing").
        deadline = time.monotonic() + 60
        while True:
            sync = httpx.get(f"{base}/admin/api/tenants/{tenant['tenant_id']}/sync",
                             headers={"Authorization": f"Bearer {admin_token}"}, timeout=10)
            assert sync.status_code == 200, sync.text
            state = sync.json()
            if state["events_total"] >= 1 and state["events_applied"] == state["events_total"]:
                break
            assert time.monotonic() < deadline, f"the worker did not catch up within 60 s: {state}"
            time.sleep(0.5)
        assert state["last_reconciled_at"] is not None

        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["database"] is True and ready.json()["broker"] is True

        # When: Ctrl-C (SIGINT to make's process group, as a terminal sends it).
        redis_pidfile = var_dir / "redis" / "redis.pid"
        redis_pids = {int(redis_pidfile.read_text())} if redis_pidfile.exists() else set()
        started_here = descendants(run.process.pid) | redis_pids | processes_naming(str(var_dir))
        assert redis_pids, "the embedded Redis wrote no pid file"
        assert len(started_here) >= 4, f"expected make, sally-scim dev, web, worker and Redis; found {started_here}"
        stopping = time.monotonic()
        os.killpg(run.process.pid, signal.SIGINT)

        # Then: everything it started has exited within STOP_TIMEOUT.
        deadline = stopping + STOP_TIMEOUT
        while time.monotonic() < deadline:
            left = {pid for pid in started_here | processes_naming(str(var_dir)) if alive(pid)}
            if run.process.poll() is not None and not left and not listening(port):
                break
            time.sleep(0.2)
        run.process.poll()
        left = {pid for pid in started_here | processes_naming(str(var_dir)) if alive(pid)}
        print(f"stopped {len(started_here)} processes in {time.monotonic() - stopping:.1f} s")
        assert run.process.returncode is not None, "make is still running"
        assert not left, f"still running after {STOP_TIMEOUT} s: {sorted(left)}"
        assert not listening(port), f"port {port} still accepts connections"
        assert not redis_pidfile.exists(), "the embedded Redis did not shut down cleanly"

        # And: it stopped gracefully, not by killing its workers.
        output = run.output()
        assert "Killing worker process" not in output
        assert "a child process exited" not in output
        assert "Traceback" not in output
    except BaseException:
        print(f"----- output of `make run` ({run.log_path}) -----\n{run.output()}")
        run.kill_everything(started_here | processes_naming(str(var_dir)))
        raise
    finally:
        run.close()
