#!/usr/bin/env python3
"""The reconcile of a mass removal: N users waiting for seats, 97 % of them taken out of the group.

    python bench/big_removal.py --database-url postgresql://postgres@127.0.0.1:5432/DB [--users 100000
        --events-per-run 10]

What it does (issue 9's 100,000-user Bulk attack, after the spend guard held it):

1. writes a tenant of `--users` users straight into the database (bench/seed.py),
   without ANALYZE, as a tenant just written by its IdP is before autovacuum;
2. makes every user wait for a seat behind a seat cap of 10 (the same waiting
   path as a purchase held by the guard) and reconciles that once;
3. takes 97 % of them out of the user group as PATCHes of 1,000 removals
   would (one sync event per 1,000 users);
4. reconciles until every event is applied, `--events-per-run` events per run
   (the worker applies what has arrived; an IdP's PATCHes arrive one by one);

and prints the seconds of step 4, the runs, this process's CPU seconds, and the
statements that took the most time in all (count and seconds). The database
must be empty or throwaway: the bench writes a tenant into it and leaves it there.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from seed import Seeded, _reconciler, seed_tenant  # noqa: E402
from sqlalchemy import delete, event, insert, text, update  # noqa: E402

from models.db import make_engine, session_scope  # noqa: E402
from models.migrate import upgrade  # noqa: E402
from models.tables import Account, GroupMember, SeatCount, SyncEvent, Tenant, utcnow  # noqa: E402

REMOVED_SHARE = 0.97
PER_EVENT = 1000


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reconcile_all(engine, tenant_id: str, batch: int) -> int:
    reconciler = _reconciler(engine)
    runs = 0
    while True:
        result = reconciler.run(tenant_id, batch=batch)
        runs += 1
        if not result.more:
            return runs


def all_waiting(engine, seeded: Seeded) -> None:
    """Every user waits for a seat behind a cap of 10; the breaker never holds (it is not measured here)."""
    now = utcnow()
    with session_scope(engine) as session:
        session.execute(update(Tenant).where(Tenant.id == seeded.tenant_id)
                        .values(seat_cap={"starter": 10}, hold_min_users=10_000_000))
        session.execute(update(Account).where(Account.tenant_id == seeded.tenant_id)
                        .values(license=None, status="pending_license", waiting_since=now))
        session.execute(update(SeatCount).where(SeatCount.tenant_id == seeded.tenant_id).values(purchased=0, assigned=0))
        session.execute(insert(SyncEvent.__table__), {"tenant_id": seeded.tenant_id, "kind": "config_changed",
                                                      "user_ids": None, "created_at": now})
    reconcile_all(engine, seeded.tenant_id, 5000)


def remove(engine, seeded: Seeded) -> int:
    with engine.connect() as conn:
        members = [m for (m,) in conn.execute(
            text("SELECT member_id FROM group_member WHERE group_id = :g ORDER BY member_id"),
            {"g": seeded.user_group})]
    gone = members[:int(len(members) * REMOVED_SHARE)]
    now = utcnow()
    with session_scope(engine) as session:
        conn = session.connection()
        table = GroupMember.__table__
        for start in range(0, len(gone), PER_EVENT):
            part = gone[start:start + PER_EVENT]
            conn.execute(delete(table).where(table.c.group_id == seeded.user_group, table.c.member_id.in_(part)))
            conn.execute(insert(SyncEvent.__table__), {"tenant_id": seeded.tenant_id, "kind": "group_updated",
                                                       "user_ids": part, "created_at": now})
    return len(gone)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events-per-run", type=int, default=10)
    args = parser.parse_args()

    engine = make_engine(args.database_url, pool_size=2)
    upgrade(engine)
    seeded = seed_tenant(engine, args.users, analyze=False)
    all_waiting(engine, seeded)
    removed = remove(engine, seeded)

    statements: dict[str, list[float]] = {}

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany):
        conn.info["bench_t"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany):
        key = " ".join(statement.split())[:90]
        entry = statements.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - conn.info["bench_t"]

    cpu_before, started = cpu(), time.perf_counter()
    runs = reconcile_all(engine, seeded.tenant_id, args.events_per_run)
    seconds, cpu_seconds = time.perf_counter() - started, cpu() - cpu_before
    top = sorted(statements.items(), key=lambda item: -item[1][1])[:6]
    print(f"{removed} of {args.users} waiting users removed in {-(-removed // PER_EVENT)} events: "
          f"reconciled in {seconds:.1f} s, {runs} runs, {cpu_seconds:.1f} s CPU in this process")
    print(f"statements: {sum(n for n, _ in statements.values())}, {sum(t for _, t in statements.values()):.1f} s")
    for key, (count, total) in top:
        print(f"  {total:7.2f} s {count:6d}x  {key}")
    print(json.dumps({"users": args.users, "removed": removed, "events_per_run": args.events_per_run,
                      "seconds": round(seconds, 2), "runs": runs, "cpu_s": round(cpu_seconds, 2),
                      "statements": sum(n for n, _ in statements.values())}))
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
