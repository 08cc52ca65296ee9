"""sally-scim against scim2-server's ASGI app, side by side in one run, one client (wrk), one machine.

Starts everything it measures itself (scim2-server's in-memory ASGI app under
uvicorn, `sally-scim web` with 1 and then 2 processes, one `sally-scim
worker`) on a fresh PostgreSQL database and a Redis namespace of its own,
drives both servers with the same wrk scripts, prints absolute numbers and
the ratio for each goal of issue 7, and stops (and drops) what it started.

    python bench/compare.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \
        --redis-url redis://127.0.0.1:6379/0

The machine may be shared: only the ratios measured in the same run mean
something; repeat runs (`--repeat`) and read the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import httpx
from sqlalchemy.engine import make_url

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_SCHEMA = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
WRK_MISSING = (
    "wrk is not installed. On Debian/Ubuntu: `apt-get install -y wrk` (as root); "
    "on macOS: `brew install wrk`. bench/compare.py drives both servers with it."
)

# One Entra-shaped user per request, a fresh userName each time (thread id + counter).
CREATE_LUA = r"""
local threads = {}
local counter = 0
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function init(args)
  prefix = args[1] .. "t" .. tostring(tid) .. "n"
  path = args[2]
  headers = {["Content-Type"] = "application/scim+json"}
  if args[3] ~= nil and args[3] ~= "" then headers["Authorization"] = "Bearer " .. args[3] end
end
function request()
  counter = counter + 1
  local n = prefix .. tostring(counter)
  local body = '{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User",' ..
    '"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],' ..
    '"externalId":"' .. n .. '","userName":"' .. n .. '@bench.example","active":true,' ..
    '"displayName":"Given ' .. n .. '","title":"Engineer",' ..
    '"emails":[{"primary":true,"type":"work","value":"' .. n .. '@bench.example"}],' ..
    '"name":{"formatted":"Given ' .. n .. '","familyName":"' .. n .. '","givenName":"Given"},' ..
    '"preferredLanguage":"en-US",' ..
    '"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User":{"employeeNumber":"' ..
    tostring(counter) .. '","department":"R&D"}}'
  return wrk.format("POST", path, headers, body)
end
""" + r"""
function done(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

# Replays prepared requests (one "METHOD<TAB>PATH<TAB>BODY" per line); thread i takes lines i, i+T, …
REPLAY_LUA = r"""
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
  thread:set("nthreads", 0)
end
function init(args)
  local nthreads = tonumber(args[2])
  headers = {["Content-Type"] = "application/scim+json"}
  if args[3] ~= nil and args[3] ~= "" then headers["Authorization"] = "Bearer " .. args[3] end
  reqs = {}
  local i = 0
  for line in io.lines(args[1]) do
    if i % nthreads == tid - 1 then
      local method, path, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
      table.insert(reqs, wrk.format(method, path, headers, body))
    end
    i = i + 1
  end
  pos = 0
  wraps = 0
end
function request()
  pos = pos + 1
  if pos > #reqs then pos = 1; wraps = wraps + 1; wrk.thread:set("wrapped", wraps) end
  return reqs[pos]
end
function done(summary, latency, requests)
  local wrapped = 0
  for _, t in ipairs(threads) do wrapped = wrapped + (t:get("wrapped") or 0) end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,"p50_us":%d,"p99_us":%d,"wrapped":%d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), wrapped))
end
"""


class BenchError(Exception):
    """The run cannot go on (a server did not start, a request failed)."""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    status_errors: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    wrapped: int = 0
    cpu_ms_per_request: float | None = None  # the server's, web processes only (not PostgreSQL's or the worker's)
    # The rest of the write's cost, where known: the worker's and this database's PostgreSQL backends'.
    other_cpu_ms_per_request: dict[str, float] | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def row(self) -> str:
        return (f"{self.rate:9.1f}/s  p50 {self.p50_ms:6.1f} ms  p99 {self.p99_ms:7.1f} ms  "
                f"({self.requests} requests, {self.status_errors} non-2xx, {self.socket_errors} socket errors)"
                + (f"  server CPU {self.cpu_ms_per_request:.2f} ms/req" if self.cpu_ms_per_request is not None else "")
                + "".join(f"  {name} {ms:.2f}" for name, ms in (self.other_cpu_ms_per_request or {}).items()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise BenchError(f"{url} did not answer within {timeout:.0f} s")


class Processes:
    """The processes this run started, each in its own process group, stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.running.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (uvicorn's workers), in KiB."""
    total = 0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{current}/task/{current}/children") as children:
                pids.extend(int(c) for c in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its live children (uvicorn's workers), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            with open(f"/proc/{current}/stat") as stat:
                # Fields after the parenthesised name: utime and stime are the 12th and 13th.
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            with open(f"/proc/{current}/task/{current}/children") as children:
                pids.extend(int(c) for c in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def backend_pids(database: str) -> list[int]:
    """PostgreSQL's backend processes serving one database (local server: their titles name it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                title = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parts = title.split()
        # "postgres: [15/main: ]user database host(port) state"
        if parts and parts[0] == "postgres:" and database in parts[1:4]:
            pids.append(int(entry))
    return pids


def other_cpu(others: Callable[[], dict[str, list[int]]] | None) -> dict[str, dict[int, float]]:
    """CPU seconds so far of each process of each named group (the worker, PostgreSQL's backends)."""
    if others is None:
        return {}
    return {name: {pid: cpu_seconds(pid) for pid in pids} for name, pids in others().items()}


def run_wrk(script: Path, url: str, args: Sequence[str], *, duration: float, connections: int, threads: int,
            server_pid: int | None = None, others: Callable[[], dict[str, list[int]]] | None = None) -> WrkResult:
    # The server's CPU per request barely moves with the machine's load, unlike its rate:
    # the steadier A/B of a code change on a shared host.
    cpu_before = cpu_seconds(server_pid) if server_pid is not None else 0.0
    others_before = other_cpu(others)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "30s", "-s", str(script), url,
         "--", *args],
        capture_output=True, text=True, check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON "):])
            return WrkResult(
                requests=data["requests"], seconds=data["duration_us"] / 1e6,
                status_errors=data["status_errors"], socket_errors=data["socket_errors"],
                p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000, wrapped=data.get("wrapped", 0),
                cpu_ms_per_request=((cpu_seconds(server_pid) - cpu_before) * 1000 / data["requests"]
                                    if server_pid is not None and data["requests"] else None),
                # Backends that connected during the run count from zero (their whole life is in it).
                other_cpu_ms_per_request={
                    name: sum(cpu - others_before.get(name, {}).get(pid, 0.0) for pid, cpu in group.items())
                    * 1000 / data["requests"]
                    for name, group in other_cpu(others).items()
                } if others is not None and data["requests"] else None,
            )
    raise BenchError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")


# ------------------------------------------------------------ the servers


@dataclass
class Target:
    """One server as the client sees it: where its Users and Groups are, and its token."""

    name: str
    base: str  # e.g. http://127.0.0.1:8301/scim/v2/<tenant>
    token: str | None
    pid: Callable[[], int | None] = lambda: None  # the serving process, for its CPU time
    # The other processes a request costs (name → pids), counted apart from the server's own CPU.
    others: Callable[[], dict[str, list[int]]] | None = None

    def headers(self) -> dict[str, str]:
        out = {"Content-Type": "application/scim+json"}
        if self.token:
            out["Authorization"] = f"Bearer {self.token}"
        return out

    def path(self, suffix: str) -> str:
        return httpx.URL(self.base + suffix).raw_path.decode()


class Sally:
    """sally-scim's web processes and one worker, on this run's database and Redis namespace."""

    def __init__(self, procs: Processes, args: argparse.Namespace, database_url: str, var_dir: Path) -> None:
        self.procs = procs
        self.port = free_port()
        self.admin_token = secrets.token_urlsafe(24)
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": args.redis_url,
            "SALLY_REDIS_NAMESPACE": f"compare{os.getpid()}",
            "SALLY_ADMIN_TOKEN": self.admin_token,
            "PORT": str(self.port),
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{self.port}",
            "SALLY_VAR_DIR": str(var_dir),
            "LOG_LEVEL": "warning",
            # A load test is exactly what the per-token rate limit is there to stop.
            "SCIM_RATE_LIMIT": "0",
        }
        self.web: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.root = f"http://127.0.0.1:{self.port}"
        self.database = make_url(database_url).database or ""

    def other_pids(self) -> dict[str, list[int]]:
        """The worker and this run's PostgreSQL backends (the web's pool and the worker's)."""
        return {"worker": [self.worker.pid] if self.worker is not None else [],
                "postgres": backend_pids(self.database)}

    def migrate(self) -> None:
        subprocess.run([str(BIN / "sally-scim"), "migrate"], env=self.env, check=True, capture_output=True)

    def start_worker(self) -> None:
        self.worker = self.procs.start("worker", [str(BIN / "sally-scim"), "worker"], self.env)

    def start_web(self, processes: int) -> None:
        if self.web is not None:
            self.procs.stop(self.web)
        env = {**self.env, "WEB_PROCESSES": str(processes)}
        self.web = self.procs.start(f"web{processes}", [str(BIN / "sally-scim"), "web"], env)
        wait_http(self.root + "/healthz")
        if processes > 1:
            # Every uvicorn worker up, not only the first to answer.
            time.sleep(3)

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, self.root + "/admin/api" + path, json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {self.admin_token}"})
        if response.status_code >= 300:
            raise BenchError(f"admin {method} {path}: {response.status_code} {response.text[:200]}")
        return response.json() if response.content else None

    def new_tenant(self, name: str) -> Target:
        tenant_id = self.admin("POST", "/tenants", {"name": name})["tenant_id"]
        token = self.admin("POST", f"/tenants/{tenant_id}/scim", {"provider": "entra"})["token"]
        return Target("sally-scim", f"{self.root}/scim/v2/{tenant_id}", token,
                      lambda: self.web.pid if self.web is not None else None, self.other_pids)

    def user_ids(self, target: Target) -> list[str]:
        tenant_id = target.base.rsplit("/", 1)[-1]
        return [u["id"] for u in self.admin("GET", f"/tenants/{tenant_id}/users") if u["status"] != "deleted"]

    def web_rss_kib(self) -> int:
        assert self.web is not None
        return rss_kib(self.web.pid)


class Reference:
    """scim2-server's ASGI app (in memory, no auth, no durability) under uvicorn, one process."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.root = f"http://127.0.0.1:{self.port}"

    def start(self) -> Target:
        self.proc = self.procs.start(
            "scim2-server",
            [str(BIN / "uvicorn"), "reference_app:app", "--port", str(self.port), "--log-level", "warning",
             "--no-access-log"],
            dict(os.environ), cwd=HERE,
        )
        wait_http(self.root + "/v2/ServiceProviderConfig")
        return Target("scim2-server", f"{self.root}/v2", None, lambda: self.proc.pid if self.proc is not None else None)

    def user_ids(self, target: Target, wanted: int) -> list[str]:
        ids: list[str] = []
        with httpx.Client(timeout=60) as client:
            while len(ids) < wanted:
                page = client.get(target.base + "/Users", params={"startIndex": len(ids) + 1, "count": 1000}).json()
                got = [r["id"] for r in page.get("Resources", [])]
                if not got:
                    break
                ids.extend(got)
        return ids


def create_groups(target: Target, count: int, run: str) -> list[str]:
    ids = []
    with httpx.Client(timeout=60, headers=target.headers()) as client:
        for index in range(count):
            body = {"schemas": [GROUP_SCHEMA], "displayName": f"Compare {run} {index:04d}", "externalId": f"{run}-{index}"}
            response = client.post(target.base + "/Groups", content=json.dumps(body))
            if response.status_code != 201:
                raise BenchError(f"{target.name}: POST /Groups answered {response.status_code} {response.text[:200]}")
            ids.append(response.json()["id"])
    return ids


def cpu_split_sample(database_url: str, sally: Sally) -> dict[str, float]:
    """CPU seconds so far of the worker and of this run's PostgreSQL backends (the web is counted by run_wrk)."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        backends = conn.execute(
            "SELECT pid, client_port FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    # Whose backend is it: the client process that owns the socket (ss), the web's or the worker's.
    owners: dict[int, int] = {}
    listing = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[4].endswith(":5432") and "pid=" in fields[5]:
            owners[int(fields[3].rsplit(":", 1)[1])] = int(fields[5].split("pid=")[1].split(",")[0])
    roots = {sally.web.pid if sally.web is not None else -1: "web",
             sally.worker.pid if sally.worker is not None else -1: "worker"}
    sample = {"worker": cpu_seconds(sally.worker.pid) if sally.worker is not None else 0.0}
    for pid, port in backends:
        sample[f"pg-{_owner(owners.get(port), roots)}-{pid}"] = cpu_seconds(pid)
    return sample


def _owner(pid: int | None, roots: dict[int, str]) -> str:
    """'web' or 'worker' when the process is one of those or a descendant (the worker forks), else 'other'."""
    while pid and pid > 1:
        if pid in roots:
            return roots[pid]
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            break
    return "other"


def split_cpu(database_url: str, sally: Sally, tenant: Target, before: dict[str, float] | None,
              requests: int) -> dict[str, float]:
    """Worker and PostgreSQL CPU ms per PATCH, counted until the worker has applied every event."""
    tenant_id = tenant.base.rsplit("/", 1)[-1]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        sync = sally.admin("GET", f"/tenants/{tenant_id}/sync")
        if sync["events_applied"] == sync["events_total"]:
            break
        time.sleep(0.5)
    after = cpu_split_sample(database_url, sally)
    before = before or {}
    worker = after["worker"] - before.get("worker", 0.0)
    # A backend that closed in between is lost (its CPU is not counted); pools keep theirs open.
    split = {"worker": worker * 1000 / requests}
    for owner in ("web", "worker", "other"):
        pg = sum(after[k] - before.get(k, 0.0) for k in after if k.startswith(f"pg-{owner}-"))
        split[f"postgres_{owner}"] = pg * 1000 / requests
    return split


def total_users(target: Target) -> int:
    """The server's own count of its users (one page of one)."""
    with httpx.Client(timeout=120, headers=target.headers()) as client:
        return int(client.get(target.base + "/Users", params={"count": 1}).json()["totalResults"])


def fill_users(workdir: Path, run_id: str, target: Target, count: Callable[[], int], wanted: int) -> None:
    """Create users (unmeasured) until the target holds at least `wanted`."""
    fill = 0
    while count() < wanted:
        fill += 1
        run_wrk(workdir / "create.lua", target.base + "/Users", [f"f{fill}{run_id}", target.path("/Users"),
                target.token or ""], duration=3, connections=4, threads=1)


def membership_requests(target: Target, groups: list[str], users: list[str], size: int, count: int, path: Path) -> int:
    """PATCHes adding `size` members each; PATCH k adds block k // G of the users to group k % G (pairs distinct)."""
    blocks = len(users) // size
    if blocks == 0:
        raise BenchError(f"{target.name}: {len(users)} users, fewer than {size}")
    count = min(count, blocks * len(groups))
    with open(path, "w") as out:
        for k in range(count):
            group = groups[k % len(groups)]
            block = users[(k // len(groups)) * size:(k // len(groups) + 1) * size]
            body = {"schemas": [PATCH_OP],
                    "Operations": [{"op": "add", "path": "members", "value": [{"value": m} for m in block]}]}
            out.write(f"PATCH\t{target.path('/Groups/' + group)}\t{json.dumps(body, separators=(',', ':'))}\n")
    return count


# ------------------------------------------------------------ reconcile in a big and a small tenant


def reconcile_cost(database_url: str, sizes: Sequence[int], samples: int) -> dict[int, list[float]]:
    """Seconds per reconcile of one membership change, in tenants of each size (seeded directly in the database)."""
    sys.path.insert(0, str(HERE))
    from seed import seed_tenant, time_one_change

    from models.db import make_engine

    engine = make_engine(database_url)
    out: dict[int, list[float]] = {}
    try:
        for size in sizes:
            seeded = seed_tenant(engine, size)
            out[size] = time_one_change(engine, seeded, samples)
    finally:
        engine.dispose()
    return out


# ------------------------------------------------------------ the run


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A database of this run's own on the given PostgreSQL server, dropped at the end."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    if url.get_backend_name() != "postgresql":
        raise BenchError("--database-url must be a PostgreSQL URL (the goals are about the production setup)")
    name = f"sally_compare_{os.getpid()}"
    plain = url.set(drivername="postgresql")
    conninfo = plain.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "connections": args.connections, "duration_s": args.duration, "rounds": []}
    workdir = Path(tempfile.mkdtemp(prefix="sally-compare-"))
    for name, text in (("create.lua", CREATE_LUA), ("replay.lua", REPLAY_LUA)):
        (workdir / name).write_text(text)
    procs = Processes(workdir)
    run_id = secrets.token_hex(3)
    wrk = {"duration": args.duration, "connections": args.connections, "threads": args.threads}
    try:
        with fresh_database(args.database_url) as database_url:
            sally = Sally(procs, args, database_url, workdir / "var")
            sally.migrate()
            ref = Reference(procs)
            ref_target = ref.start()
            sally.start_worker()
            sally.start_web(1)
            tenant = sally.new_tenant(f"compare {run_id}")
            # Warm both up (imports, pools, first compilations): not measured.
            for target in (ref_target, tenant):
                run_wrk(workdir / "create.lua", target.base + "/Users", [f"w{run_id}", target.path("/Users"),
                        target.token or ""], duration=2, connections=2, threads=1)
            report["web_rss_idle_kib"] = sally.web_rss_kib()

            if args.only_patches:
                # The users the PATCH phase needs, created the same way but not measured.
                for target in (ref_target, tenant):
                    fill_users(workdir, run_id, target, lambda t=target: total_users(t), args.patch_users)
            for round_no in range(0 if args.only_patches else args.repeat):
                r: dict[str, Any] = {}
                for label, target in (("ref", ref_target), ("sally1", tenant)):
                    spy = start_spy(args, target, round_no, label, "")
                    res = run_wrk(workdir / "create.lua", target.base + "/Users",
                                  [f"r{round_no}{label}{run_id}", target.path("/Users"), target.token or ""],
                                  server_pid=target.pid(), others=target.others, **wrk)
                    if spy is not None:
                        spy.wait(timeout=60)
                    r[f"creates_{label}"] = res
                    print(f"round {round_no + 1} creates  {label:7s} {res.row()}", flush=True)
                report["rounds"].append(r)

            # memberships in 1,000-member PATCHes (both servers, same schedule)
            size = 1000 if not args.skip_patch1000 else 0
            users_ref = ref.user_ids(ref_target, args.patch_users) if size else []
            users_sally = sally.user_ids(tenant)[: args.patch_users] if size else []
            for label, target, users in (("ref", ref_target, users_ref), ("sally1", tenant, users_sally)) if size else ():
                groups = create_groups(target, args.patch_groups, f"{label}{run_id}")
                count = membership_requests(target, groups, users, size, 100_000, workdir / f"patch-{label}.tsv")
                before = cpu_split_sample(database_url, sally) if label == "sally1" else None
                spy = None
                if args.py_spy and label == "sally1":
                    # Sampling profile of the web process during the measured phase (collapsed stacks).
                    spy = subprocess.Popen([str(BIN / "py-spy"), "record", "-p", str(target.pid()), "-d",
                                            str(int(args.duration)), "-f", "raw", "-o", str(args.py_spy)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                res = run_wrk(workdir / "replay.lua", target.base + "/Groups",
                              [str(workdir / f"patch-{label}.tsv"), str(args.threads), target.token or ""],
                                  server_pid=target.pid(), **wrk)
                if spy is not None:
                    spy.wait(timeout=60)
                report[f"patch1000_{label}"] = res
                if label == "sally1" and res.requests:
                    report["patch1000_cpu_ms"] = split_cpu(database_url, sally, tenant, before, res.requests)
                print(f"1,000-member PATCHes {label:7s} {res.row()}  = {res.rate * size:,.0f} memberships/s"
                      f"{'  (WRAPPED: re-sent PATCHes)' if res.wrapped else ''}  [{count} prepared]", flush=True)

            if not args.skip_burst:
                burst = subprocess.run(
                    [sys.executable, str(HERE / "burst.py"), "--base-url", sally.root, "--admin-token",
                     sally.admin_token, "--json-out", str(workdir / "burst.json"), "--quiet"],
                    capture_output=True, text=True, check=False,
                )
                report["burst_exit"] = burst.returncode
                if burst.returncode == 0 or (workdir / "burst.json").exists():
                    data = json.loads((workdir / "burst.json").read_text())
                    report["burst"] = {name: data["phases"][name]["requests_per_s"] for name in data["phases"]}
                    report["burst_caught_up_s"] = data.get("catch_up_s_from_last_write")
                report["web_rss_after_burst_kib"] = sally.web_rss_kib()
                print(f"burst (10k users) exit {burst.returncode}: {report.get('burst')}", flush=True)
                if not args.skip_patch_cost:
                    cost = subprocess.run(
                        [sys.executable, str(HERE / "burst.py"), "--base-url", sally.root, "--admin-token",
                         sally.admin_token, "--patch-cost", "--json-out", str(workdir / "cost.json"), "--quiet"],
                        capture_output=True, text=True, check=False,
                    )
                    if (workdir / "cost.json").exists():
                        report["patch_cost"] = json.loads((workdir / "cost.json").read_text()).get("p50_ratio_big_over_empty")
                    print(f"patch cost exit {cost.returncode}: {report.get('patch_cost')}", flush=True)

            if args.only_patches:
                return report
            # Two web processes: creates again, against the same reference.
            sally.start_web(2)
            run_wrk(workdir / "create.lua", tenant.base + "/Users", [f"w2{run_id}", tenant.path("/Users"),
                    tenant.token], duration=2, connections=2, threads=1)
            for round_no in range(args.repeat):
                r = report["rounds"][round_no]
                for label, target in (("ref", ref_target), ("sally2", tenant)):
                    spy = start_spy(args, target, round_no, label, ".2web")
                    res = run_wrk(workdir / "create.lua", target.base + "/Users",
                                  [f"s{round_no}{label}{run_id}", target.path("/Users"), target.token or ""],
                                  server_pid=target.pid(), others=target.others, **wrk)
                    if spy is not None:
                        spy.wait(timeout=60)
                    r[f"creates_{label}_b"] = res
                    print(f"round {round_no + 1} creates  {label:7s} {res.row()}", flush=True)
            procs.stop_all()

            if not args.skip_reconcile:
                costs = reconcile_cost(database_url, (args.small_tenant, args.big_tenant), args.reconcile_samples)
                report["reconcile_ms"] = {size: [s * 1000 for s in c] for size, c in costs.items()}
                print("reconcile of one membership change, median ms: " + ", ".join(
                    f"{size:,} users {median(v):.2f}" for size, v in report["reconcile_ms"].items()), flush=True)
    finally:
        procs.stop_all()
        _forget_namespace(args.redis_url, f"compare{os.getpid()}")
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")
    return report


def start_spy(args: argparse.Namespace, target: Target, round_no: int, label: str,
              suffix: str) -> subprocess.Popen[bytes] | None:
    """py-spy over sally-scim's web processes (uvicorn's workers too) during its first create round, if asked."""
    if not args.py_spy_creates or round_no != 0 or not label.startswith("sally"):
        return None
    out = args.py_spy_creates.with_name(args.py_spy_creates.name + suffix)
    return subprocess.Popen([str(BIN / "py-spy"), "record", "-p", str(target.pid()), "--subprocesses", "-d",
                             str(int(args.duration)), "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _forget_namespace(redis_url: str, namespace: str) -> None:
    """Delete this run's Redis keys (queues, flags, counters): the server may be shared."""
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        for key in client.scan_iter(f"{namespace}*"):
            client.delete(key)
    except (redis.RedisError, OSError):
        pass


def summarise(report: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(goal, measured ratio, target, detail) for each goal."""
    rounds = report["rounds"]
    rows: list[tuple[str, float, float, str]] = []

    def ratio(key: str, ref_key: str) -> tuple[float, str]:
        ratios = [r[key].rate / r[ref_key].rate for r in rounds if r[ref_key].rate]
        detail = "; ".join(f"{r[key].rate:.0f} vs {r[ref_key].rate:.0f}/s" for r in rounds)
        return median(ratios), detail

    value, detail = ratio("creates_sally1", "creates_ref")
    rows.append(("user creates/s, WEB_PROCESSES=1 vs scim2-server", value, 2.0, detail))
    value, detail = ratio("creates_sally2_b", "creates_ref_b")
    rows.append(("user creates/s, WEB_PROCESSES=2 vs scim2-server", value, 3.0, detail))
    ref, ours = report.get("patch1000_ref"), report.get("patch1000_sally1")
    if ref is not None and ours is not None:
        detail = f"{ours.rate * 1000:,.0f} vs {ref.rate * 1000:,.0f} memberships/s"
        value = ours.rate / ref.rate if ref.rate else float("nan")
        if ours.wrapped or ref.wrapped:
            # Re-sent PATCHes add members already there: cheaper, so the rate would flatter the server.
            value, detail = float("nan"), f"not measured: PATCHes re-sent, raise --patch-groups ({detail})"
        rows.append(("memberships/s in 1,000-member PATCHes vs scim2-server", value, 15.0, detail))
    if "burst" in report:
        # An absolute goal (4x the 80/s of issue 7's measurement), not a same-run ratio.
        rate = report["burst"].get("memberships", float("nan"))
        rows.append(("100-member PATCHes/s in bench/burst.py, in units of 80/s", rate / 80, 4.0,
                     f"{rate:.0f}/s (goal 320/s)"))
        rss = report["web_rss_after_burst_kib"] / report["web_rss_idle_kib"]
        rows.append(("web RSS after a 10k burst / idle (at most)", rss, 2.0,
                     f"{report['web_rss_after_burst_kib'] / 1024:.0f} MiB vs {report['web_rss_idle_kib'] / 1024:.0f} MiB"))
    if report.get("patch_cost"):
        for op, value in report["patch_cost"].items():
            rows.append((f"1-member PATCH {op}, 20k group / empty group, p50 (at most)", value, 1.5, ""))
    if report.get("reconcile_ms"):
        sizes = sorted(report["reconcile_ms"])
        small, big = (median(report["reconcile_ms"][s]) for s in (sizes[0], sizes[-1]))
        rows.append((f"reconcile of one change, {sizes[-1]:,} / {sizes[0]:,} users (at most)", big / small, 2.0,
                     f"{big:.2f} ms vs {small:.2f} ms"))
    return rows


def print_summary(rows: list[tuple[str, float, float, str]]) -> None:
    print()
    print(f"{'goal':66s} {'measured':>9s} {'target':>7s}  detail")
    for goal, value, target, detail in rows:
        at_most = "(at most)" in goal
        ok = value <= target if at_most else value >= target
        print(f"{goal:66s} {value:8.2f}x {target:6.1f}x  {'ok ' if ok else 'NO '} {detail}")


def print_cpu(report: dict[str, Any]) -> None:
    """Server CPU per request (web processes only), median over the rounds: not a goal, the load-robust A/B."""
    pairs = [("creates, 1 web process", "creates_ref", "creates_sally1"),
             ("creates, 2 web processes", "creates_ref_b", "creates_sally2_b")]
    print()
    for name, ref_key, key in pairs:
        ref = [r[ref_key].cpu_ms_per_request for r in report["rounds"] if r.get(ref_key)]
        ours = [r[key].cpu_ms_per_request for r in report["rounds"] if r.get(key)]
        if ref and ours and None not in ref + ours:
            print(f"server CPU per request, {name}: scim2-server {median(ref):.2f} ms, sally-scim {median(ours):.2f} ms"
                  f" (scim2-server / sally-scim {median(ref) / median(ours):.2f}x)")
        others = [r[key].other_cpu_ms_per_request for r in report["rounds"] if r.get(key)]
        if others and all(others):
            print("  and per sally-scim create, besides the web: " + ", ".join(
                f"{name} {median([o[name] for o in others]):.2f} ms" for name in others[0]))
    ref, ours = report.get("patch1000_ref"), report.get("patch1000_sally1")
    if ref and ours and ref.cpu_ms_per_request and ours.cpu_ms_per_request:
        print(f"server CPU per 1,000-member PATCH: scim2-server {ref.cpu_ms_per_request:.2f} ms, "
              f"sally-scim {ours.cpu_ms_per_request:.2f} ms (web process only; PostgreSQL and the worker not counted)")
    split = report.get("patch1000_cpu_ms")
    if split:
        print(f"sally-scim CPU per 1,000-member PATCH, counted until the worker caught up: worker {split['worker']:.2f} ms;"
              f" PostgreSQL backends of the web {split['postgres_web']:.2f} ms, of the worker"
              f" {split['postgres_worker']:.2f} ms, others {split['postgres_other']:.2f} ms")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL",
                        "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a PostgreSQL server; the run creates and drops a database of its own there")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk phase")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the create phases")
    parser.add_argument("--patch-users", type=int, default=5000)
    # 5 PATCHes per group of --patch-users 5,000: 600 groups give 3,000 PATCHes, more than a 10 s phase sends
    # (~150/s on merged main after session 4: 300 groups, 1,500 PATCHes, no longer were).
    parser.add_argument("--patch-groups", type=int, default=600)
    parser.add_argument("--small-tenant", type=int, default=1000)
    parser.add_argument("--big-tenant", type=int, default=100_000)
    parser.add_argument("--reconcile-samples", type=int, default=20)
    parser.add_argument("--only-patches", action="store_true",
                        help="only the 1,000-member PATCH phase (users created unmeasured first) and, "
                        "unless --skip-burst, bench/burst.py")
    parser.add_argument("--py-spy", type=Path, help="write py-spy's collapsed stacks of the web process during "
                        "sally-scim's 1,000-member PATCH phase to this file")
    parser.add_argument("--py-spy-creates", type=Path, help="write py-spy's collapsed stacks of the web "
                        "processes during sally-scim's first create round to this file (two web processes: "
                        "FILE.2web); that round's numbers then carry the profiler's cost")
    parser.add_argument("--skip-burst", action="store_true", help="no bench/burst.py (no RSS, no 100-member PATCH rate)")
    parser.add_argument("--skip-patch-cost", action="store_true")
    parser.add_argument("--skip-patch1000", action="store_true", help="no 1,000-member PATCH phase")
    parser.add_argument("--skip-reconcile", action="store_true")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--json-out", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("wrk") is None:
        print(WRK_MISSING, file=sys.stderr)
        return 64
    try:
        report = run(args)
    except BenchError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 1
    if args.only_patches:
        ref, ours = report["patch1000_ref"], report["patch1000_sally1"]
        wrapped = "  NOT MEASURED: PATCHes re-sent, raise --patch-groups" if ours.wrapped or ref.wrapped else ""
        print(f"\nmemberships/s in 1,000-member PATCHes vs scim2-server: {ours.rate / ref.rate:.2f}x (goal 15x){wrapped}")
        if "burst" in report:
            print(f"100-member PATCHes/s in bench/burst.py: {report['burst'].get('memberships', float('nan')):.0f}"
                  " (goal 320/s)")
        print_cpu(report)
        return 0
    rows = summarise(report)
    print_summary(rows)
    print_cpu(report)
    if args.json_out:
        def plain(value: Any) -> Any:
            return value.__dict__ | {"rate": value.rate} if isinstance(value, WrkResult) else str(value)

        args.json_out.write_text(json.dumps({"report": report, "goals": rows}, indent=2, default=plain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
