"""The web process's memory, round by round: the same load N times, RSS after each round.

A leak grows with every round; a plateau (allocator arenas, pools, caches)
stops growing after the first. Issue 7's goal, "web RSS after a 10k burst
≤ 2× idle", is read by bench/compare.py once; this shows which of the two it
is, and what a setting changes:

    python bench/rss.py --rounds 4
    python bench/rss.py --rounds 4 --web-env WEB_MALLOC_ARENAS=0 --web-env WEB_MALLOC_MMAP_THRESHOLD=0

One round is compare.py's load on sally-scim alone: `--duration` seconds of
user creates (wrk, `--connections`), `--duration` seconds of 1,000-member
PATCHes on groups new in that round (bodies of ~50–70 KB, parsed off the
event loop), then bench/burst.py (10,000 users, 50 groups, 20,000
memberships in 100-member PATCHes, then the admin API's list of its users).
The first round also lists every user through the admin API, as compare.py
does. It starts one web process and one worker on a fresh PostgreSQL
database and a Redis namespace of its own, and drops both at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (  # noqa: E402 - bench/ is not a package
    CREATE_LUA,
    HERE,
    REPLAY_LUA,
    WRK_MISSING,
    BenchError,
    Processes,
    Sally,
    _forget_namespace,
    create_groups,
    fresh_database,
    membership_requests,
    run_wrk,
)

MEMBERS = 1000


def memory_kib(pid: int) -> dict[str, int]:
    """Rss and its anonymous part (the heap), from /proc/PID/smaps_rollup, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Anonymous"):
                out[name] = int(rest.split()[0])
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


def row(label: str, mem: dict[str, int], idle: dict[str, int]) -> str:
    return (f"{label:<14} RSS {mem['Rss'] / 1024:7.1f} MiB  ({mem['Rss'] / idle['Rss']:.2f}x idle)  "
            f"anonymous {mem['Anonymous'] / 1024:7.1f} MiB  threads {mem['threads']}")


def run(args: argparse.Namespace) -> list[dict[str, int]]:
    workdir = Path(tempfile.mkdtemp(prefix="sally-rss-"))
    for name, text in (("create.lua", CREATE_LUA), ("replay.lua", REPLAY_LUA)):
        (workdir / name).write_text(text)
    procs = Processes(workdir)
    run_id = os.urandom(3).hex()
    wrk = {"duration": args.duration, "connections": args.connections, "threads": args.threads}
    samples: list[dict[str, int]] = []
    try:
        with fresh_database(args.database_url) as database_url:
            sally = Sally(procs, args, database_url, workdir / "var")
            sally.env.update(dict(pair.split("=", 1) for pair in args.web_env))
            sally.migrate()
            sally.start_worker()
            sally.start_web(1)
            assert sally.web is not None
            tenant = sally.new_tenant(f"rss {run_id}")
            run_wrk(workdir / "create.lua", tenant.base + "/Users", [f"w{run_id}", tenant.path("/Users"), tenant.token],
                    duration=2, connections=2, threads=1)
            idle = memory_kib(sally.web.pid)
            samples.append(idle)
            print(row("idle", idle, idle), flush=True)
            users: list[str] = []
            for round_no in range(1, args.rounds + 1):
                res = run_wrk(workdir / "create.lua", tenant.base + "/Users",
                              [f"r{round_no}{run_id}", tenant.path("/Users"), tenant.token], **wrk)
                created = res.requests
                if not users:
                    # compare.py's one list of every user (the admin API), in the first round only.
                    users = sally.user_ids(tenant)[: args.patch_users]
                groups = create_groups(tenant, args.patch_groups, f"g{round_no}{run_id}")
                prepared = workdir / f"patch-{round_no}.tsv"
                membership_requests(tenant, groups, users, MEMBERS, 100_000, prepared)
                patches = run_wrk(workdir / "replay.lua", tenant.base + "/Groups",
                                  [str(prepared), str(args.threads), tenant.token], **wrk)
                burst = subprocess.run(
                    [sys.executable, str(HERE / "burst.py"), "--base-url", sally.root, "--admin-token",
                     sally.admin_token, "--run-id", f"b{round_no}{run_id}", "--quiet"],
                    capture_output=True, text=True, check=False,
                )
                if burst.returncode not in (0, 3):
                    raise BenchError(f"burst.py exited {burst.returncode}: {burst.stderr[-500:]}")
                time.sleep(args.settle)
                mem = memory_kib(sally.web.pid)
                samples.append(mem)
                print(row(f"after round {round_no}", mem, idle)
                      + f"   ({created} creates, {patches.requests} 1,000-member PATCHes"
                      + f"{' re-sent' if patches.wrapped else ''}, burst exit {burst.returncode})", flush=True)
    finally:
        procs.stop_all()
        _forget_namespace(args.redis_url, f"compare{os.getpid()}")
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return samples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL",
                        "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a PostgreSQL server; the run creates and drops a database of its own there")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of creates and of PATCHes per round")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--patch-users", type=int, default=5000)
    parser.add_argument("--patch-groups", type=int, default=300, help="new groups per round for the PATCH phase")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between a round's end and the reading")
    parser.add_argument("--web-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the web process and worker (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import shutil

    if shutil.which("wrk") is None:
        print(WRK_MISSING, file=sys.stderr)
        return 64
    try:
        samples = run(args)
    except BenchError as exc:
        print(f"rss: {exc}", file=sys.stderr)
        return 1
    if len(samples) > 2:
        growth = [(b["Rss"] - a["Rss"]) / 1024 for a, b in pairwise(samples[1:])]
        print("growth per round after the first: " + ", ".join(f"{g:+.1f} MiB" for g in growth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
