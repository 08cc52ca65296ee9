#!/usr/bin/env python3
"""Replay an IdP's initial sync against a running sally-scim server and measure it.

    python bench/burst.py --base-url http://127.0.0.1:8000 [--users 10000 --groups 50
        --memberships 20000 --concurrency 8] [--json-out result.json]

What it does, as Microsoft Entra ID's first provisioning cycle would:

1. creates a tenant through the admin API and connects SCIM (`--provider`);
2. phase `users`: POST /Users (Entra's shape: core + EnterpriseUser extension);
3. phase `groups`: POST /Groups {displayName, externalId} (no members, as Entra);
4. phase `memberships`: PATCH /Groups/{id} with `Add members` operations of
   `--batch` values each, spread over the groups so that parallel requests
   rarely wait on the same group;
5. the admin maps the groups (PUT …/scim/config, auto_invite on);
6. polls GET …/sync until every event is applied and nothing is pending.

It prints, per phase, requests, requests/s, p50/p95/p99 latency and errors
by status; then the time until the pipeline caught up (from the last write),
the purchases and their statuses, the Stripe calls and the invitations sent,
and checks every user's role and license against what the memberships and
the mapping imply. The last line of output is one JSON object.

`--patch-cost` measures instead what a 1-member PATCH costs on a group of
`--patch-members` members and on an empty group (DESIGN.md: the same).

Exit status: 0 when every request succeeded, the pipeline caught up in time
and the end state is right; 1 when a request failed; 2 on a timeout; 3 when
the end state is wrong; 64 for bad arguments (a non-loopback URL included).

Requests go only to `--base-url`, which must be a loopback address: this is
a load generator, not something to point at a server you do not own.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit

import httpx

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_SCHEMA = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SCIM_JSON = "application/scim+json"
TIERS = ("starter", "team", "enterprise")
PROVIDERS = ("entra", "google", "okta", "onelogin", "pingone")
DEPARTMENTS = ("Sales", "Engineering", "Finance", "Support", "Marketing", "Operations")

EXIT_OK, EXIT_REQUEST_FAILED, EXIT_TIMEOUT, EXIT_WRONG_STATE, EXIT_USAGE = 0, 1, 2, 3, 64


class BenchError(Exception):
    """A step the bench cannot go on without failed (tenant creation, mapping)."""


# --------------------------------------------------------------- safety


def require_loopback(base_url: str) -> str:
    """The server root without a trailing slash, or SystemExit when it is not a loopback address."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"burst: --base-url must be an http(s) URL, got {base_url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise SystemExit("burst: --base-url takes no credentials, query or fragment")
    host = parts.hostname
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parts.port or 80, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise SystemExit(f"burst: cannot resolve {host!r}: {exc}") from None
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    if not addresses or not all(address.is_loopback for address in addresses):
        shown = ", ".join(sorted(str(a) for a in addresses))
        raise SystemExit(f"burst: refusing {host!r} ({shown}): --base-url must be a loopback address")
    return base_url.rstrip("/")


def make_client(base_url: str, timeout: float) -> httpx.Client:
    """One keep-alive connection; no proxies from the environment, no redirects followed."""
    return httpx.Client(
        base_url=base_url,
        timeout=timeout,
        trust_env=False,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


# ------------------------------------------------------------- requests


@dataclass
class Job:
    method: str
    path: str
    body: bytes | None = None
    tag: Any = None


@dataclass
class PhaseResult:
    name: str
    requests: int = 0
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.requests / self.wall if self.wall > 0 else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies, p)

    def tenth_rates(self) -> tuple[float, float] | None:
        """Requests/s over the first and the last tenth of the requests (does the cost grow as the tenant does?)."""
        done = sorted(self.finished)
        tenth = len(done) // 10
        if tenth < 10:
            return None
        first = done[tenth - 1] - self.started_at
        last = self.ended_at - done[-tenth - 1]
        return (tenth / first if first > 0 else 0.0, tenth / last if last > 0 else 0.0)

    def summary(self) -> dict[str, Any]:
        tenths = self.tenth_rates()
        return {
            "requests": self.requests,
            "seconds": round(self.wall, 3),
            "requests_per_s": round(self.rate, 1),
            "p50_ms": ms(self.percentile(50)),
            "p95_ms": ms(self.percentile(95)),
            "p99_ms": ms(self.percentile(99)),
            "max_ms": ms(max(self.latencies) if self.latencies else 0.0),
            "errors": dict(sorted(self.errors.items())),
            "requests_per_s_first_tenth": round(tenths[0], 1) if tenths else None,
            "requests_per_s_last_tenth": round(tenths[1], 1) if tenths else None,
        }


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class Scim:
    """A SCIM endpoint of one tenant, driven by C threads, each with its own keep-alive client."""

    def __init__(self, base_url: str, scim_path: str, token: str, concurrency: int, timeout: float) -> None:
        self.base_url = base_url
        self.prefix = scim_path.rstrip("/")
        self.headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": SCIM_JSON,
            "Accept": SCIM_JSON,
            "User-Agent": "sally-bench-burst (Entra-shaped)",
        }
        self.clients = [make_client(base_url, timeout) for _ in range(concurrency)]

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def run(
        self,
        name: str,
        jobs: Sequence[Job],
        on_done: Callable[[Job, httpx.Response], None] | None = None,
        concurrency: int | None = None,
    ) -> PhaseResult:
        """Send every job, `concurrency` at a time; a non-2xx answer or a transport error counts as an error."""
        result = PhaseResult(name)
        clients = self.clients[: concurrency or len(self.clients)]
        lock = threading.Lock()
        cursor = iter(jobs)

        def next_job() -> Job | None:
            with lock:
                return next(cursor, None)

        def work(client: httpx.Client) -> None:
            latencies: list[float] = []
            finished: list[float] = []
            statuses: Counter = Counter()
            errors: Counter = Counter()
            samples: list[str] = []
            while (job := next_job()) is not None:
                started = time.perf_counter()
                try:
                    response = client.request(
                        job.method, self.prefix + job.path, content=job.body, headers=self.headers
                    )
                except httpx.HTTPError as exc:
                    latencies.append(time.perf_counter() - started)
                    finished.append(time.monotonic())
                    errors[f"exc:{type(exc).__name__}"] += 1
                    if len(samples) < 3:
                        samples.append(f"{job.method} {job.path}: {type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - started)
                finished.append(time.monotonic())
                statuses[response.status_code] += 1
                if 200 <= response.status_code < 300:
                    if on_done is not None:
                        on_done(job, response)
                else:
                    errors[str(response.status_code)] += 1
                    if len(samples) < 3:
                        samples.append(f"{job.method} {job.path}: {response.status_code} {response.text[:300]}")
            with lock:
                result.latencies.extend(latencies)
                result.finished.extend(finished)
                result.statuses.update(statuses)
                result.errors.update(errors)
                result.error_samples.extend(samples[: max(0, 5 - len(result.error_samples))])

        threads = [threading.Thread(target=work, args=(client,), daemon=True) for client in clients]
        result.started_at = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result.ended_at = time.monotonic()
        result.wall = result.ended_at - result.started_at
        result.requests = len(result.latencies)
        return result


class Admin:
    """The admin API (one client; a failure here stops the bench)."""

    def __init__(self, base_url: str, token: str, timeout: float) -> None:
        self.client = make_client(base_url, timeout)
        self.client.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, path: str, body: Any = None, expect: Iterable[int] = (200,)) -> Any:
        response = self.client.request(method, "/admin/api" + path, json=body)
        if response.status_code not in tuple(expect):
            raise BenchError(f"{method} /admin/api{path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None

    def metrics_text(self) -> str | None:
        response = self.client.get("/metrics")
        return response.text if response.status_code == 200 else None


def stripe_calls(metrics_text: str | None) -> dict[str, float] | None:
    """`sally_stripe_calls_total{outcome="…"} n` by outcome, or None when the server has no such metric."""
    if metrics_text is None or "sally_stripe_calls" not in metrics_text:
        return None
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("sally_stripe_calls_total"):
            continue
        labels, _, value = line.rpartition(" ")
        outcome = "all"
        if 'outcome="' in labels:
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
        out[outcome] = out.get(outcome, 0.0) + float(value)
    return out


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# ------------------------------------------------------------ the IdP


def user_body(run: str, index: int) -> dict[str, Any]:
    """A user as Entra sends it on create."""
    given, family = f"Given{index}", f"Family{index}"
    upn = f"user{index:06d}.{run}@bench.example"
    return {
        "schemas": [USER_SCHEMA, ENTERPRISE_SCHEMA],
        "externalId": f"{run}-{index:06d}",
        "userName": upn,
        "active": True,
        "displayName": f"{given} {family}",
        "title": "Engineer" if index % 3 else "Manager",
        "emails": [{"primary": True, "type": "work", "value": upn}],
        "meta": {"resourceType": "User"},
        "name": {"formatted": f"{given} {family}", "familyName": family, "givenName": given},
        "preferredLanguage": "en-US",
        ENTERPRISE_SCHEMA: {
            "employeeNumber": str(100000 + index),
            "department": DEPARTMENTS[index % len(DEPARTMENTS)],
        },
    }


def group_body(run: str, index: int) -> dict[str, Any]:
    return {
        "schemas": [GROUP_SCHEMA],
        "externalId": f"{run}-g{index:04d}",
        "displayName": f"Bench group {index:04d} {run}",
        "meta": {"resourceType": "Group"},
    }


def add_members_body(member_ids: Sequence[str]) -> dict[str, Any]:
    """Entra's membership PATCH: one `Add` operation on `members`."""
    return {
        "schemas": [PATCH_OP],
        "Operations": [
            {"op": "Add", "path": "members", "value": [{"$ref": None, "value": mid} for mid in member_ids]}
        ],
    }


def remove_members_body(member_ids: Sequence[str]) -> dict[str, Any]:
    return {
        "schemas": [PATCH_OP],
        "Operations": [{"op": "Remove", "path": "members", "value": [{"value": mid} for mid in member_ids]}],
    }


def membership_pairs(users: int, groups: int, memberships: int) -> list[tuple[int, int]]:
    """(user, group) pairs: membership k puts user k % N in group (k % N + k // N) % G — all distinct."""
    return [(k % users, (k % users + k // users) % groups) for k in range(memberships)]


def group_slots(groups: int) -> dict[int, str]:
    """The mapping: group 0 admin, other even groups user, odd groups a tier (starter, team, enterprise, …).

    With two consecutive groups per user (the default 2 memberships per
    user), everyone gets access and a license.
    """
    slots = {}
    for index in range(groups):
        if index % 2 == 0:
            slots[index] = "admin" if index == 0 else "user"
        else:
            slots[index] = TIERS[(index // 2) % len(TIERS)]
    return slots


def expected_entitlements(
    user_count: int, pairs: Sequence[tuple[int, int]], slots: dict[int, str]
) -> list[tuple[str | None, str | None]]:
    """(role, license) per user index: admin wins over user, the lowest tier wins."""
    in_groups: list[set[int]] = [set() for _ in range(user_count)]
    for user, group in pairs:
        in_groups[user].add(group)
    out: list[tuple[str | None, str | None]] = []
    for groups in in_groups:
        kinds = {slots[g] for g in groups}
        role = "admin" if "admin" in kinds else ("user" if "user" in kinds else None)
        tiers = [tier for tier in TIERS if tier in kinds]
        out.append((role, tiers[0] if role and tiers else None))
    return out


def interleaved_batches(members_by_group: dict[str, list[str]], batch: int) -> list[Job]:
    """Membership PATCHes round-robin over the groups, so that parallel requests hit different groups."""
    per_group = {
        gid: [ids[i:i + batch] for i in range(0, len(ids), batch)] for gid, ids in members_by_group.items() if ids
    }
    jobs: list[Job] = []
    rounds = max((len(chunks) for chunks in per_group.values()), default=0)
    for round_no in range(rounds):
        for gid, chunks in per_group.items():
            if round_no < len(chunks):
                jobs.append(Job("PATCH", f"/Groups/{gid}", dumps(add_members_body(chunks[round_no])), gid))
    return jobs


# --------------------------------------------------------------- set-up


def create_tenant(admin: Admin, args: argparse.Namespace, run: str) -> tuple[str, str, str]:
    """(tenant_id, SCIM path on --base-url, token)."""
    body: dict[str, Any] = {"name": f"bench {run}"}
    if args.stripe_customer:
        body["stripe_customer_id"] = args.stripe_customer
    if args.stripe_subscription:
        body["stripe_subscription_id"] = args.stripe_subscription
    tenant_id = admin.call("POST", "/tenants", body, expect=(201,))["tenant_id"]
    connected = admin.call("POST", f"/tenants/{tenant_id}/scim", {"provider": args.provider}, expect=(201,))
    # The Tenant URL is `{PUBLIC_BASE_URL}/scim/v2/{tenant_id}` (CONTRACT.md); whatever host
    # PUBLIC_BASE_URL names, requests go only to --base-url.
    return tenant_id, f"/scim/v2/{tenant_id}", connected["token"]


# ----------------------------------------------------------------- burst


def wait_caught_up(admin: Admin, tenant_id: str, timeout: float, interval: float, quiet: bool) -> tuple[bool, dict[str, Any], float, int]:
    """Poll …/sync until caught up: (caught_up, last state, monotonic time seen, polls)."""
    deadline = time.monotonic() + timeout
    polls = 0
    last_report = time.monotonic()
    state: dict[str, Any] = {}
    while True:
        state = admin.call("GET", f"/tenants/{tenant_id}/sync")
        polls += 1
        now = time.monotonic()
        if (
            state["events_applied"] == state["events_total"]
            and state["pending_purchases"] == 0
            and state["pending_invitations"] == 0
        ):
            return True, state, now, polls
        if now >= deadline:
            return False, state, now, polls
        if not quiet and now - last_report >= 5:
            last_report = now
            print(
                f"  … events {state['events_applied']}/{state['events_total']}, "
                f"pending purchases {state['pending_purchases']}, invitations {state['pending_invitations']}",
                file=sys.stderr, flush=True,
            )
        time.sleep(interval)


def run_burst(args: argparse.Namespace, base_url: str) -> tuple[dict[str, Any], int]:
    run = args.run_id or time.strftime("%Y%m%d%H%M%S")
    admin = Admin(base_url, args.admin_token, args.request_timeout)
    stripe_before = stripe_calls(admin.metrics_text())
    tenant_id, scim_path, token = create_tenant(admin, args, run)
    scim = Scim(base_url, scim_path, token, args.concurrency, args.request_timeout)
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        # users
        say(f"tenant {tenant_id}: {args.users} users …")
        user_ids: list[str | None] = [None] * args.users
        jobs = [Job("POST", "/Users", dumps(user_body(run, i)), i) for i in range(args.users)]

        def user_created(job: Job, response: httpx.Response) -> None:
            user_ids[job.tag] = response.json()["id"]

        phases = [scim.run("users", jobs, user_created)]

        # groups
        say(f"{args.groups} groups …")
        group_ids: list[str | None] = [None] * args.groups
        jobs = [Job("POST", "/Groups", dumps(group_body(run, i)), i) for i in range(args.groups)]

        def group_created(job: Job, response: httpx.Response) -> None:
            group_ids[job.tag] = response.json()["id"]

        phases.append(scim.run("groups", jobs, group_created))

        # memberships
        pairs = membership_pairs(args.users, args.groups, args.memberships)
        members_by_group: dict[str, list[str]] = {gid: [] for gid in group_ids if gid}
        for user, group in pairs:
            if user_ids[user] and group_ids[group]:
                members_by_group[group_ids[group]].append(user_ids[user])
        jobs = interleaved_batches(members_by_group, args.batch)
        say(f"{args.memberships} memberships in {len(jobs)} PATCHes of ≤{args.batch} …")
        phases.append(scim.run("memberships", jobs))
        last_scim_write = phases[-1].ended_at

        # the admin maps the groups
        slots = group_slots(args.groups)
        config: dict[str, Any] = {
            "user_groups": [], "admin_groups": [], "license_groups": {tier: [] for tier in TIERS}, "auto_invite": True,
        }
        for index, slot in slots.items():
            gid = group_ids[index]
            if gid is None:
                continue
            if slot in ("user", "admin"):
                config[f"{slot}_groups"].append(gid)
            else:
                config["license_groups"][slot].append(gid)
        started = time.monotonic()
        admin.call("PUT", f"/tenants/{tenant_id}/scim/config", config)
        last_write = time.monotonic()
        config_phase = PhaseResult("config", requests=1, wall=last_write - started, latencies=[last_write - started],
                                   started_at=started, ended_at=last_write)
        config_phase.statuses[200] += 1
        phases.append(config_phase)
        cpu_writes = resource.getrusage(resource.RUSAGE_SELF)

        # catch-up
        say("waiting for the pipeline to catch up …")
        caught_up, sync, seen_at, polls = wait_caught_up(admin, tenant_id, args.timeout, args.poll_interval, args.quiet)
        purchases = admin.call("GET", f"/tenants/{tenant_id}/purchases")
        users = admin.call("GET", f"/tenants/{tenant_id}/users")
        licenses = admin.call("GET", f"/tenants/{tenant_id}/licenses")
        stripe_after = stripe_calls(admin.metrics_text())
    finally:
        scim.close()
        admin.close()

    # the end state, against what the memberships and the mapping imply
    expected = expected_entitlements(args.users, pairs, slots)
    by_id = {row["id"]: row for row in users}
    mismatches: list[str] = []
    for index, uid in enumerate(user_ids):
        if uid is None:
            continue
        row = by_id.get(uid)
        role, tier = expected[index]
        if row is None:
            mismatches.append(f"user {index} ({uid}) missing from …/users")
            continue
        want_status = "no_access" if role is None else "active"
        got = (row["role"], row["license"], row["status"])
        if got != (role, tier, want_status):
            mismatches.append(f"user {index}: expected {(role, tier, want_status)}, got {got} {row.get('status_reason') or ''}")
    expected_invites = sum(1 for index, uid in enumerate(user_ids) if uid and expected[index][0] is not None)
    invited = sum(1 for row in users if row.get("invited_at"))
    invite_errors = sum(1 for row in users if row.get("invite_error"))

    stripe_metric = None
    if stripe_before is not None and stripe_after is not None:
        stripe_metric = {k: stripe_after.get(k, 0) - stripe_before.get(k, 0) for k in set(stripe_after) | set(stripe_before)}
        stripe_metric = {k: int(v) for k, v in sorted(stripe_metric.items()) if v}

    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    write_phases = [p for p in phases if p.name != "config"]
    report = {
        "mode": "burst",
        "base_url": base_url,
        "tenant_id": tenant_id,
        "params": {
            "users": args.users, "groups": args.groups, "memberships": args.memberships,
            "concurrency": args.concurrency, "batch": args.batch, "provider": args.provider,
        },
        "phases": {p.name: p.summary() for p in phases},
        "writes": {
            "requests": sum(p.requests for p in write_phases),
            "seconds": round(last_scim_write - phases[0].started_at, 3),
        },
        "caught_up": caught_up,
        "catch_up_s_from_last_write": round(seen_at - last_write, 2) if caught_up else None,
        "catch_up_s_from_last_scim_write": round(seen_at - last_scim_write, 2) if caught_up else None,
        "sync": sync,
        "sync_polls": polls,
        # time.monotonic() of each boundary, to line the run up with system monitors
        "timeline": {
            **{f"{p.name}_start": round(p.started_at, 3) for p in phases},
            "last_write": round(last_write, 3),
            "caught_up": round(seen_at, 3),
        },
        "purchases": {
            "count": len(purchases),
            "statuses": dict(Counter(p["status"] for p in purchases)),
            "with_stripe_invoice": sum(1 for p in purchases if p.get("stripe_invoice_id")),
            "quantities_after_last": purchases[-1]["quantities_after"] if purchases else None,
        },
        "stripe_calls_metric": stripe_metric,
        "licenses": licenses,
        "users": {
            "count": len(users),
            "statuses": dict(Counter(row["status"] for row in users)),
            "roles": dict(Counter(str(row["role"]) for row in users)),
        },
        "invitations": {"sent": invited, "invite_errors": invite_errors, "expected": expected_invites},
        "check": {"mismatches": len(mismatches), "samples": mismatches[:5]},
        "client_cpu_s": {
            "writes": round(_cpu(cpu_writes) - _cpu(cpu_start), 2),
            "total": round(_cpu(cpu_end) - _cpu(cpu_start), 2),
        },
        "error_samples": {p.name: p.error_samples for p in phases if p.error_samples},
    }
    failed = sum(p.failed for p in phases)
    if failed:
        code = EXIT_REQUEST_FAILED
    elif not caught_up:
        code = EXIT_TIMEOUT
    elif mismatches or invited != expected_invites:
        code = EXIT_WRONG_STATE
    else:
        code = EXIT_OK
    report["exit_code"] = code
    return report, code


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def print_burst(report: dict[str, Any]) -> None:
    p = report["params"]
    print(f"sally-scim burst: {p['users']} users, {p['groups']} groups, {p['memberships']} memberships "
          f"(PATCH batches of {p['batch']}), concurrency {p['concurrency']}, provider {p['provider']}")
    print(f"tenant {report['tenant_id']} on {report['base_url']}")
    print()
    print_phase_table(report["phases"])
    w = report["writes"]
    print(f"\nSCIM writes: {w['requests']} requests in {w['seconds']:.2f} s "
          f"({w['requests'] / w['seconds'] if w['seconds'] else 0:.0f} requests/s overall)")
    print()
    rows = []
    if report["caught_up"]:
        rows.append(("caught up", f"{report['catch_up_s_from_last_write']:.2f} s after the last write (mapping PUT); "
                                  f"{report['catch_up_s_from_last_scim_write']:.2f} s after the last SCIM write"))
    else:
        rows.append(("caught up", "NO — timed out"))
    s = report["sync"]
    rows.append(("sync", f"events {s['events_applied']}/{s['events_total']} applied, pending purchases "
                         f"{s['pending_purchases']}, pending invitations {s['pending_invitations']}"))
    pur = report["purchases"]
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(pur["statuses"].items())) or "none"
    rows.append(("purchases", f"{pur['count']} ({statuses}); after: {pur['quantities_after_last']}"))
    metric = report["stripe_calls_metric"]
    metric_text = ("not exposed" if metric is None
                   else (", ".join(f"{k}: {v}" for k, v in metric.items()) or "0"))
    rows.append(("Stripe calls", f"{pur['with_stripe_invoice']} purchase(s) with an invoice id; "
                                 f"/metrics sally_stripe_calls_total this run: {metric_text}"))
    lic = report["licenses"]
    rows.append(("licenses", "; ".join(f"{t} {lic[t]['assigned']}/{lic[t]['purchased']}" for t in TIERS if t in lic)
                 + " (assigned/purchased)"))
    u = report["users"]
    rows.append(("users", f"{u['count']}: " + ", ".join(f"{k} {v}" for k, v in sorted(u["statuses"].items()))
                 + "; roles " + ", ".join(f"{k} {v}" for k, v in sorted(u["roles"].items()))))
    inv = report["invitations"]
    rows.append(("invitations", f"{inv['sent']} sent (invited_at set) of {inv['expected']} expected, "
                                f"{inv['invite_errors']} invite_error"))
    c = report["check"]
    rows.append(("end state", "every role and license as expected" if not c["mismatches"]
                 else f"{c['mismatches']} user(s) wrong, e.g. {c['samples'][:2]}"))
    cpu = report["client_cpu_s"]
    rows.append(("bench CPU", f"{cpu['writes']:.1f} s during the writes, {cpu['total']:.1f} s in all (this process)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print_error_samples(report)


def print_phase_table(phases: dict[str, dict[str, Any]]) -> None:
    header = (f"{'phase':<14}{'requests':>9}{'seconds':>9}{'req/s':>9}{'1st 10%':>9}{'last 10%':>9}"
              f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}  errors")
    print(header)
    print("-" * len(header))
    for name, s in phases.items():
        errors = ", ".join(f"{k}×{v}" for k, v in s["errors"].items()) or "-"
        first, last = (s.get(k) for k in ("requests_per_s_first_tenth", "requests_per_s_last_tenth"))
        print(f"{name:<14}{s['requests']:>9}{s['seconds']:>9.2f}{s['requests_per_s']:>9.1f}"
              f"{'-' if first is None else f'{first:.1f}':>9}{'-' if last is None else f'{last:.1f}':>9}{s['p50_ms']:>9.2f}"
              f"{s['p95_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['max_ms']:>9.2f}  {errors}")


def print_error_samples(report: dict[str, Any]) -> None:
    for phase, samples in report.get("error_samples", {}).items():
        for sample in samples:
            print(f"error sample ({phase}): {sample}")


# ------------------------------------------------------------ patch cost


def run_patch_cost(args: argparse.Namespace, base_url: str) -> tuple[dict[str, Any], int]:
    """1-member PATCHes (Add, then Remove) on a group of N members and on an empty group, interleaved."""
    run = args.run_id or time.strftime("%Y%m%d%H%M%S")
    size, samples = args.patch_members, args.samples
    admin = Admin(base_url, args.admin_token, args.request_timeout)
    tenant_id, scim_path, token = create_tenant(admin, args, run)
    scim = Scim(base_url, scim_path, token, args.concurrency, args.request_timeout)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    setup: list[PhaseResult] = []
    try:
        total_users = size + samples + args.warmup
        say(f"tenant {tenant_id}: {total_users} users …")
        user_ids: list[str | None] = [None] * total_users
        jobs = [Job("POST", "/Users", dumps(user_body(run, i)), i) for i in range(total_users)]

        def user_created(job: Job, response: httpx.Response) -> None:
            user_ids[job.tag] = response.json()["id"]

        setup.append(scim.run("setup users", jobs, user_created))
        group_ids: list[tuple[str, str]] = []

        def group_created(job: Job, response: httpx.Response) -> None:
            group_ids.append((job.tag, response.json()["id"]))

        setup.append(scim.run("setup groups", [
            Job("POST", "/Groups", dumps(group_body(run, 0)), "big"),
            Job("POST", "/Groups", dumps(group_body(run, 1)), "empty"),
        ], group_created, concurrency=1))
        groups = dict(group_ids)
        if set(groups) != {"big", "empty"} or any(u is None for u in user_ids):
            raise BenchError("set-up failed: " + "; ".join(s for p in setup for s in p.error_samples))
        say(f"filling one group with {size} members …")
        members = [uid for uid in user_ids[:size] if uid]
        fill = [Job("PATCH", f"/Groups/{groups['big']}", dumps(add_members_body(members[i:i + args.fill_batch])))
                for i in range(0, len(members), args.fill_batch)]
        setup.append(scim.run("setup fill", fill, concurrency=1))
        counts = {g["id"]: g["members"] for g in admin.call("GET", f"/tenants/{tenant_id}/groups")}
        if counts.get(groups["big"]) != size or counts.get(groups["empty"]) != 0:
            raise BenchError(f"set-up failed: member counts {counts}")

        say(f"{samples} interleaved 1-member PATCH pairs (Add, Remove) on each group …")
        spare = user_ids[size:]
        results = {f"{g} {op}": PhaseResult(f"{g} {op}") for g in ("big", "empty") for op in ("add", "remove")}
        client = scim.clients[0]
        warm = PhaseResult("warm-up")
        for index, uid in enumerate(spare):
            measured = index >= args.warmup
            order = ("big", "empty") if index % 2 == 0 else ("empty", "big")
            for name in order:
                for op, body in (("add", add_members_body([uid])), ("remove", remove_members_body([uid]))):
                    target = results[f"{name} {op}"] if measured else warm
                    _timed(client, scim, "PATCH", f"/Groups/{groups[name]}", dumps(body), target)
        counts = {g["id"]: g["members"] for g in admin.call("GET", f"/tenants/{tenant_id}/groups")}
    finally:
        scim.close()
        admin.close()
    for phase in results.values():
        phase.requests = len(phase.latencies)
        phase.wall = sum(phase.latencies)
    summary = {name: phase.summary() for name, phase in results.items()}
    ratios = {
        op: round(results[f"big {op}"].percentile(50) / results[f"empty {op}"].percentile(50), 2)
        if results[f"empty {op}"].latencies else None
        for op in ("add", "remove")
    }
    report = {
        "mode": "patch-cost",
        "base_url": base_url,
        "tenant_id": tenant_id,
        "params": {"patch_members": size, "samples": samples, "warmup": args.warmup},
        "setup": {p.name: p.summary() for p in setup},
        "results": summary,
        "p50_ratio_big_over_empty": ratios,
        "member_counts_after": {"big": counts.get(groups["big"]), "empty": counts.get(groups["empty"])},
        "error_samples": {p.name: p.error_samples for p in [*setup, warm, *results.values()] if p.error_samples},
    }
    failed = sum(p.failed for p in [*setup, warm, *results.values()])
    code = EXIT_REQUEST_FAILED if failed else EXIT_OK
    report["exit_code"] = code
    return report, code


def _timed(client: httpx.Client, scim: Scim, method: str, path: str, body: bytes, into: PhaseResult) -> None:
    started = time.perf_counter()
    try:
        response = client.request(method, scim.prefix + path, content=body, headers=scim.headers)
    except httpx.HTTPError as exc:
        into.latencies.append(time.perf_counter() - started)
        into.errors[f"exc:{type(exc).__name__}"] += 1
        return
    into.latencies.append(time.perf_counter() - started)
    into.statuses[response.status_code] += 1
    if not 200 <= response.status_code < 300:
        into.errors[str(response.status_code)] += 1
        if len(into.error_samples) < 3:
            into.error_samples.append(f"{method} {path}: {response.status_code} {response.text[:300]}")


def print_patch_cost(report: dict[str, Any]) -> None:
    p = report["params"]
    print(f"sally-scim patch cost: 1-member PATCH on a {p['patch_members']}-member group vs an empty group, "
          f"{p['samples']} samples each (after {p['warmup']} warm-up), sequential, interleaved")
    print(f"tenant {report['tenant_id']} on {report['base_url']}")
    print()
    print_phase_table(report["setup"])
    print()
    header = f"{'group / op':<14}{'samples':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}  errors"
    print(header)
    print("-" * len(header))
    for name, s in report["results"].items():
        errors = ", ".join(f"{k}×{v}" for k, v in s["errors"].items()) or "-"
        print(f"{name:<14}{s['requests']:>9}{s['p50_ms']:>9.2f}{s['p95_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['max_ms']:>9.2f}  {errors}")
    ratios = report["p50_ratio_big_over_empty"]
    print(f"\np50 big/empty: add {ratios['add']}×, remove {ratios['remove']}×; "
          f"members after: {report['member_counts_after']}")
    print_error_samples(report)


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="burst.py", description="Replay an IdP's initial sync against a running sally-scim server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (loopback only)")
    parser.add_argument("--admin-token", default=os.environ.get("SALLY_ADMIN_TOKEN"),
                        help="admin bearer (default: $SALLY_ADMIN_TOKEN)")
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--memberships", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=8, help="parallel keep-alive connections")
    parser.add_argument("--batch", type=int, default=100, help="members per PATCH Add operation")
    parser.add_argument("--provider", default="entra", choices=PROVIDERS)
    parser.add_argument("--stripe-customer", help="stripe_customer_id of the new tenant")
    parser.add_argument("--stripe-subscription", help="stripe_subscription_id of the new tenant")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the pipeline to catch up")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="seconds between …/sync polls")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds per HTTP request")
    parser.add_argument("--json-out", help="also write the JSON result to this file")
    parser.add_argument("--run-id", help="suffix for userNames and externalIds (default: a timestamp)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    cost = parser.add_argument_group("patch cost (--patch-cost)")
    cost.add_argument("--patch-cost", action="store_true",
                      help="measure a 1-member PATCH on a large group vs an empty group instead of the burst")
    cost.add_argument("--patch-members", type=int, default=20000, help="members of the large group")
    cost.add_argument("--samples", type=int, default=200, help="measured Add+Remove pairs per group")
    cost.add_argument("--warmup", type=int, default=20, help="unmeasured pairs first")
    cost.add_argument("--fill-batch", type=int, default=1000, help="members per PATCH when filling the large group")
    return parser


def validate(args: argparse.Namespace) -> str | None:
    if not args.admin_token:
        return "an admin token is required (--admin-token or SALLY_ADMIN_TOKEN)"
    for name in ("users", "groups", "concurrency", "batch", "patch_members", "samples", "fill_batch"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if args.memberships < 0 or args.warmup < 0:
        return "--memberships and --warmup may not be negative"
    if args.memberships > args.users * args.groups:
        return "--memberships may be at most --users × --groups (each pair once)"
    if bool(args.stripe_customer) != bool(args.stripe_subscription):
        return "--stripe-customer and --stripe-subscription go together"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = validate(args)
    if problem:
        parser.print_usage(sys.stderr)
        print(f"burst.py: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        base_url = require_loopback(args.base_url)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.patch_cost:
            report, code = run_patch_cost(args, base_url)
            print_patch_cost(report)
        else:
            report, code = run_burst(args, base_url)
            print_burst(report)
    except (BenchError, httpx.HTTPError) as exc:
        print(f"burst.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REQUEST_FAILED
    line = json.dumps(report, separators=(",", ":"), default=str)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as out:
            out.write(json.dumps(report, indent=2, default=str) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
