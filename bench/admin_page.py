#!/usr/bin/env python3
"""How long the admin page's heaviest requests take on a large tenant.

    python bench/admin_page.py [--users 10000 --groups 50 --memberships 20000]
        [--database-url postgresql://…/sally_bench_page] [--repeat 5]

Seeds one tenant straight into the database (users, groups, memberships,
accounts as the pipeline would leave them, a saved mapping), then times, in
process through the real app (Starlette's TestClient, no network):

- the mapping page (every group with its member count);
- the preview of a changed mapping (the whole directory + accounts, billing/preview.py);
- the user list, page 1 and a search, and the last page;
- one user's page (groups, what gave the role and tier, history);
- the admin API's preview (POST …/scim/config/preview);
- the admin API's user list (GET …/users: every user, no paging, CONTRACT.md).

It prints p50 and max per request over ``--repeat`` runs and a last line of JSON.
Without ``--database-url`` it uses a fresh SQLite file in a temporary folder;
with one, that database must be empty or absent tables are created (it is
migrated), and the seeded rows are left there.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from api.app import Services, create_app  # noqa: E402
from models.db import make_engine, session_scope  # noqa: E402
from models.migrate import upgrade  # noqa: E402
from models.settings import Settings  # noqa: E402
from models.tables import (  # noqa: E402
    Account,
    GroupMapping,
    GroupMember,
    ScimGroup,
    ScimUser,
    SyncEvent,
    Tenant,
    new_id,
    utcnow,
)

TOKEN = "bench-admin-token"
TIERS = ("starter", "team", "enterprise")


def seed(engine, users: int, groups: int, memberships: int) -> tuple[str, list[str], list[str]]:
    """One tenant: users, groups, memberships, accounts and a mapping (groups 0/1 user/admin, 2-4 tiers)."""
    rng = random.Random(7)
    now = utcnow()
    tenant_id = new_id()
    user_ids = [new_id() for _ in range(users)]
    group_ids = [new_id() for _ in range(groups)]
    with session_scope(engine) as session:
        session.add(Tenant(id=tenant_id, name="Bench", scim_enabled=True, provider="entra", auto_invite=True))
        session.flush()
        rows = [
            {"id": uid, "tenant_id": tenant_id, "user_name": f"user{i:05d}@bench.example",
             "user_name_key": f"user{i:05d}@bench.example", "display_name": f"User {i}", "active": True,
             "data": {"emails": [{"value": f"user{i:05d}@bench.example", "primary": True}]}, "version": 1,
             "created_at": now, "updated_at": now}
            for i, uid in enumerate(user_ids)
        ]
        for start in range(0, len(rows), 1000):
            session.execute(insert(ScimUser), rows[start:start + 1000])
        session.execute(insert(ScimGroup), [
            {"id": gid, "tenant_id": tenant_id, "display_name": f"Group {g}", "display_name_key": f"group {g}",
             "data": {}, "version": 1, "created_at": now, "updated_at": now}
            for g, gid in enumerate(group_ids)
        ])
        pairs: set[tuple[str, str]] = set()
        # Everyone in group 0 (access), the rest spread at random.
        for uid in user_ids:
            pairs.add((group_ids[0], uid))
        while len(pairs) < memberships:
            pairs.add((rng.choice(group_ids), rng.choice(user_ids)))
        member_rows = [{"group_id": gid, "member_id": uid, "tenant_id": tenant_id, "member_type": "User"}
                       for gid, uid in pairs]
        for start in range(0, len(member_rows), 2000):
            session.execute(insert(GroupMember), member_rows[start:start + 2000])
        session.execute(insert(GroupMapping), [
            {"tenant_id": tenant_id, "group_id": group_ids[0], "slot": "user"},
            {"tenant_id": tenant_id, "group_id": group_ids[1], "slot": "admin"},
            *({"tenant_id": tenant_id, "group_id": group_ids[2 + i], "slot": tier} for i, tier in enumerate(TIERS)),
        ])
        account_rows = [
            {"user_id": uid, "tenant_id": tenant_id, "role": "user", "wanted_tier": "starter", "license": "starter",
             "status": "active", "updated_at": now, "first_access_at": now}
            for uid in user_ids
        ]
        for start in range(0, len(account_rows), 1000):
            session.execute(insert(Account), account_rows[start:start + 1000])
        session.execute(insert(SyncEvent), [
            {"tenant_id": tenant_id, "kind": "user_created", "user_ids": [uid], "created_at": now, "applied_at": now}
            for uid in user_ids
        ])
    return tenant_id, user_ids, group_ids


def timed(call, repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = call()
        samples.append((time.perf_counter() - started) * 1000)
        if response.status_code >= 400:
            raise SystemExit(f"{response.request.method} {response.request.url} answered {response.status_code}")
    return statistics.median(samples), max(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--memberships", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    if args.groups < 5 or args.users < 1 or args.memberships < args.users:
        parser.error("need at least 5 groups, 1 user and as many memberships as users")

    folder = Path(tempfile.mkdtemp(prefix="sally-bench-page-"))
    settings = Settings(var_dir=folder, database_url=args.database_url or "", admin_token=TOKEN,
                        public_base_url="http://testserver")
    engine = make_engine(settings.database_url)
    upgrade(engine)
    started = time.perf_counter()
    tenant_id, user_ids, group_ids = seed(engine, args.users, args.groups, args.memberships)
    print(f"seeded {args.users} users, {args.groups} groups, {args.memberships} memberships "
          f"in {time.perf_counter() - started:.1f} s ({engine.dialect.name})")

    app = create_app(settings, Services(engine, wake=lambda _t: None, ping_broker=lambda: True))
    results: dict[str, tuple[float, float]] = {}
    with TestClient(app, base_url="http://testserver") as client:
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text).group(1)
        client.post("/login", data={"token": TOKEN, "csrf": csrf}, follow_redirects=False)
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text).group(1)
        base = f"/tenants/{tenant_id}"
        changed = {"csrf": csrf, "action": "preview", "user": [group_ids[0], group_ids[5 % len(group_ids)]],
                   "admin": group_ids[1], f"tier:{group_ids[3]}": "team", f"tier:{group_ids[4]}": "enterprise"}
        api_body = {"user_groups": [group_ids[0]], "admin_groups": [group_ids[1]],
                    "license_groups": {"team": [group_ids[3]], "enterprise": [group_ids[4]]}}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        last_page = max(1, -(-args.users // settings.web_page_size))
        cases = {
            "GET mapping page": lambda: client.get(f"{base}/mapping"),
            "POST mapping preview (page)": lambda: client.post(f"{base}/mapping", data=changed),
            "POST …/scim/config/preview (API)": lambda: client.post(
                f"/admin/api{base}/scim/config/preview", json=api_body, headers=headers),
            "GET users page 1": lambda: client.get(f"{base}/users"),
            f"GET users page {last_page}": lambda: client.get(f"{base}/users", params={"page": last_page}),
            "GET users search": lambda: client.get(f"{base}/users", params={"q": "user0999"}),
            "GET one user": lambda: client.get(f"{base}/users/{user_ids[len(user_ids) // 2]}"),
            "GET sync page": lambda: client.get(f"{base}/sync"),
            "GET …/users (API, every user)": lambda: client.get(f"/admin/api{base}/users", headers=headers),
        }
        for name, call in cases.items():
            call()  # warm-up
            results[name] = timed(call, args.repeat)
    print(f"{'request':40} {'p50 ms':>9} {'max ms':>9}")
    for name, (p50, worst) in results.items():
        print(f"{name:40} {p50:9.1f} {worst:9.1f}")
    print(json.dumps({"users": args.users, "groups": args.groups, "memberships": args.memberships,
                      "database": engine.dialect.name,
                      "ms": {name: {"p50": round(p50, 1), "max": round(worst, 1)} for name, (p50, worst) in results.items()}}))
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
