"""The `sally-scim` command: dev, migrate, tenant create, web, worker, jobs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from models.redaction import install_secret_masking
from models.settings import Settings, SettingsError

log = logging.getLogger("sally_scim")


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"sally-scim: {exc}") from None


def _configure_logging(settings: Settings | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings is not None:
        install_secret_masking(settings.secrets())


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    """Bring the schema up to date (no broker is started)."""
    from models.db import make_engine
    from models.migrate import upgrade

    # No statement timeout here: a migration may rewrite a large table.
    engine = make_engine(settings.database_url, connect_timeout=settings.database_connect_timeout)
    upgrade(engine)
    engine.dispose()
    print("database schema is up to date")
    return 0


def create_tenant_with_scim(
    settings: Settings, name: str, provider: str, customer: str | None, subscription: str | None
) -> dict[str, str]:
    from api import service
    from models.db import engine_from_settings, session_scope

    engine = engine_from_settings(settings)
    try:
        with session_scope(engine) as session:
            # Audited like the admin API and the page, by who did it.
            tenant = service.create_tenant(session, service.CLI_ACTOR, name, customer, subscription)
            credentials = service.connect_scim(session, settings, service.CLI_ACTOR, tenant, provider)
            return {"tenant_id": tenant.id, "tenant_url": credentials.tenant_url, "token": credentials.token}
    finally:
        engine.dispose()


def cmd_tenant_create(settings: Settings, args: argparse.Namespace) -> int:
    """Create a tenant and set up SCIM; the token is printed once (no broker is started)."""
    from api.tenants import TenantError

    if bool(args.stripe_customer) != bool(args.stripe_subscription):
        print("sally-scim: --stripe-customer and --stripe-subscription go together", file=sys.stderr)
        return 2
    try:
        created = create_tenant_with_scim(
            settings, args.name, args.provider, args.stripe_customer, args.stripe_subscription
        )
    except TenantError as exc:
        print(f"sally-scim: {exc.detail}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(created))
    else:
        print(f"Tenant:     {created['tenant_id']}")
        print(f"Tenant URL: {created['tenant_url']}")
        print(f"Token:      {created['token']}   (shown once; store it in your IdP)")
    return 0


def cmd_purchases_export(settings: Settings, args: argparse.Namespace) -> int:
    """Print a tenant's purchase ledger as CSV for finance (no broker, no Stripe call)."""
    from api import tenants
    from api.service import parse_since
    from billing.ledger import csv_lines, ledger_rows
    from models.db import engine_from_settings, session_scope

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"sally-scim: {exc}", file=sys.stderr)
        return 2
    engine = engine_from_settings(settings)
    try:
        with session_scope(engine) as session:
            try:
                tenant = tenants.get_tenant(session, args.tenant)
            except tenants.TenantError as exc:
                print(f"sally-scim: {exc.detail}", file=sys.stderr)
                return 2
            for line in csv_lines(tenant, ledger_rows(session, tenant.id, since)):
                sys.stdout.write(line)
    finally:
        engine.dispose()
    sys.stdout.flush()
    return 0


def app_factory():
    """The ASGI app for uvicorn (`--factory`), built from the environment."""
    from api.allocator import tune_malloc
    from api.app import create_app

    settings = _settings()
    _configure_logging(settings)
    # Here, in each uvicorn process (WEB_PROCESSES > 1 spawns fresh interpreters), before its thread pool starts.
    tune_malloc(settings.web_malloc_arenas, settings.web_malloc_mmap_threshold)
    return create_app(settings)


def cmd_web(settings: Settings, _args: argparse.Namespace) -> int:
    """Serve the SCIM receiver and admin API with uvicorn."""
    import uvicorn

    if not settings.admin_token:
        print("sally-scim: SALLY_ADMIN_TOKEN is not set; refusing to serve an admin API without one", file=sys.stderr)
        return 2
    from api.server import PROTOCOL
    from workers.broker import release_embedded_redis, resolve_redis_url

    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again;
    # with the default action that would kill the process before `finally`
    # releases the embedded Redis, leaving a redis-server behind.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    log.info("admin page at %s/ (sign in with the admin token)", settings.public_base_url)
    try:
        if not settings.redis_url:
            # Attach here so the embedded Redis outlives uvicorn's worker processes.
            resolve_redis_url(settings)
        uvicorn.run(
            "api.cli:app_factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.web_processes if settings.web_processes > 1 else None,
            log_level=os.environ.get("LOG_LEVEL", "info").lower(),
            proxy_headers=True,
            server_header=False,
            # uvicorn[standard]'s C parser (with one socket write per response, api/server.py)
            # and loop, named so a missing wheel fails loudly instead of silently serving on
            # the pure-Python fallbacks; no access log (one log record per SCIM write; the
            # metrics count requests by route).
            http=PROTOCOL,
            loop="uvloop",
            access_log=False,
        )
    finally:
        release_embedded_redis()
    return 0


def _exit_on_signal(_signum: int, _frame: object) -> None:
    """Stop through `finally` blocks and atexit handlers, not the default kill."""
    raise SystemExit(0)


def cmd_worker(settings: Settings, _args: argparse.Namespace) -> int:
    """Run Dramatiq worker processes (each also runs the sweep, one at a time across workers)."""
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    from workers.broker import release_embedded_redis, resolve_redis_url
    from workers.names import INVITE_QUEUE, RECONCILE_QUEUE

    argv = [
        "workers.entrypoint",
        "--processes", str(settings.worker_processes),
        "--threads", str(settings.worker_threads),
        "--worker-shutdown-timeout", "30000",
        # The purchases queue runs on PURCHASE_THREADS of its own (workers/purchase_pool.py),
        # so a Stripe that does not answer never stalls reconcile or invitations.
        "--queues", RECONCILE_QUEUE, INVITE_QUEUE,
    ]
    # Until Dramatiq sets its own handlers, a SIGTERM still releases the embedded Redis.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        if not settings.redis_url:
            resolve_redis_url(settings)
        return dramatiq_main(make_argument_parser().parse_args(argv)) or 0
    finally:
        release_embedded_redis()


def _demo_credentials(settings: Settings) -> dict[str, str]:
    """The embedded default's demo tenant, kept in SALLY_VAR_DIR so a restart keeps it."""
    from api import tenants
    from models.db import engine_from_settings, session_scope

    path = settings.var_dir / "demo-tenant.json"
    if path.exists():
        stored = json.loads(path.read_text())
        engine = engine_from_settings(settings)
        try:
            with session_scope(engine) as session:
                try:
                    tenant = tenants.get_tenant(session, stored["tenant_id"])
                    if tenant.scim_enabled:
                        return stored
                except tenants.TenantError:
                    pass
        finally:
            engine.dispose()
    created = create_tenant_with_scim(settings, "Demo", "entra", None, None)
    write_private(path, json.dumps(created))
    return created


def _admin_token(settings: Settings) -> str:
    if settings.admin_token:
        return settings.admin_token
    path = settings.var_dir / "admin-token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    write_private(path, token)
    return token


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read: created 0600 (never readable for a moment), then renamed into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    """The embedded default: SQLite, embedded Redis, web and one worker; Ctrl-C stops it all."""
    from workers.broker import release_embedded_redis, resolve_redis_url

    settings.var_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cmd_migrate(settings, args)
    admin_token = _admin_token(settings)
    demo = _demo_credentials(settings)
    if not settings.redis_url:
        resolve_redis_url(settings)
    env = dict(os.environ, SALLY_ADMIN_TOKEN=admin_token, SALLY_VAR_DIR=str(settings.var_dir))
    command = [sys.executable, "-m", "api.cli"]
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    # Set before the children start, so that no signal finds them unowned;
    # SIGHUP too (the terminal closed), as the children do not get it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    children: list[subprocess.Popen] = []
    exit_code = 0
    try:
        # Each child in a session of its own: Ctrl-C reaches only this
        # process, which stops each child with exactly one SIGTERM. Two
        # signals (the terminal's SIGINT to the whole group, then ours) make
        # Dramatiq kill its worker processes instead of letting jobs finish.
        for role in ("web", "worker"):
            children.append(subprocess.Popen([*command, role], env=env, start_new_session=True))
        print(
            "\n"
            f"  Sally SCIM is running at http://{settings.host}:{settings.port}\n"
            f"  Admin page:       {settings.public_base_url}/\n"
            f"  Admin token:      {admin_token}\n"
            f"  Demo Tenant URL:  {demo['tenant_url']}\n"
            f"  Demo Token:       {demo['token']}\n"
            f"  (sign in to the admin page with the admin token;\n"
            f"   kept in {settings.var_dir}/; Ctrl-C stops everything)\n",
            flush=True,
        )
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    print(f"sally-scim: a child process exited with {child.returncode}; stopping", file=sys.stderr)
                    stopping = True
                    exit_code = 1
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # The child leads its own process group: take its workers too.
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        release_embedded_redis()
    return exit_code


def _with_dead_letters(settings: Settings, use):
    """Run ``use(DeadLetters)``; an embedded Redis attached for it is released after."""
    from workers.broker import make_broker, redis_client, release_embedded_redis, resolve_redis_url
    from workers.deadletters import DeadLetters
    from workers.names import QUEUES

    url = resolve_redis_url(settings)
    try:
        return use(DeadLetters(make_broker(settings, url), redis_client(url, settings), settings.redis_namespace, QUEUES))
    finally:
        if not settings.redis_url:
            release_embedded_redis()


def cmd_jobs_failed(settings: Settings, args: argparse.Namespace) -> int:
    """List the dead letters: jobs given up after their last retry (actor, args, when, error)."""
    letters = _with_dead_letters(settings, lambda dead: dead.list())
    if args.json:
        print(json.dumps([letter.as_dict() for letter in letters]))
        return 0
    if not letters:
        print("no failed jobs")
        return 0
    for letter in letters:
        arguments = ", ".join(map(str, letter.args))
        print(f"{letter.id}  {letter.failed_at:%Y-%m-%d %H:%M:%S}Z  {letter.actor}({arguments})  {letter.error}")
    print(f"{len(letters)} failed job(s); `sally-scim jobs retry --all` or `... retry ID` re-queues them")
    return 0


def cmd_jobs_retry(settings: Settings, args: argparse.Namespace) -> int:
    """Re-queue dead letters (all, or the given ids) with a fresh set of retries."""
    if args.all == bool(args.ids):
        print("sally-scim: give either --all or one or more job ids (see `sally-scim jobs failed`)", file=sys.stderr)
        return 2
    retried = _with_dead_letters(settings, lambda dead: dead.retry(None if args.all else args.ids))
    missing = sorted(set(args.ids) - set(retried))
    print(f"re-queued {len(retried)} job(s)")
    if missing:
        print(f"sally-scim: not a failed job (any more): {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sally-scim", description="SCIM 2.0 provisioning for Sally.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dev", help="run the embedded default (what `make run` runs)").set_defaults(func=cmd_dev)
    commands.add_parser("migrate", help="bring the database schema up to date").set_defaults(func=cmd_migrate)
    commands.add_parser("web", help="serve the SCIM and admin API").set_defaults(func=cmd_web)
    commands.add_parser("worker", help="run the pipeline workers").set_defaults(func=cmd_worker)
    tenant = commands.add_parser("tenant", help="manage tenants").add_subparsers(dest="tenant_command", required=True)
    create = tenant.add_parser("create", help="create a tenant with SCIM set up")
    create.add_argument("name")
    create.add_argument("--provider", default="entra", choices=["entra", "google", "okta", "onelogin", "pingone"])
    create.add_argument("--stripe-customer", dest="stripe_customer")
    create.add_argument("--stripe-subscription", dest="stripe_subscription")
    create.add_argument("--json", action="store_true", help="print one JSON line")
    create.set_defaults(func=cmd_tenant_create)
    purchases = commands.add_parser("purchases", help="the purchase ledger").add_subparsers(
        dest="purchases_command", required=True
    )
    export = purchases.add_parser("export", help="print a tenant's purchases as CSV (one line per invoice)")
    export.add_argument("--tenant", required=True, help="tenant id")
    export.add_argument("--since", help="only purchases created or settled on or after this date (YYYY-MM-DD) or time")
    export.set_defaults(func=cmd_purchases_export)
    jobs = commands.add_parser("jobs", help="inspect and re-queue failed jobs").add_subparsers(
        dest="jobs_command", required=True)
    failed = jobs.add_parser("failed", help="list the jobs given up after their last retry (dead letters)")
    failed.add_argument("--json", action="store_true", help="print one JSON array")
    failed.set_defaults(func=cmd_jobs_failed)
    retry = jobs.add_parser("retry", help="re-queue failed jobs with a fresh set of retries")
    retry.add_argument("--all", action="store_true", help="every failed job")
    retry.add_argument("ids", nargs="*", help="ids from `sally-scim jobs failed`")
    retry.set_defaults(func=cmd_jobs_retry)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    settings = _settings()
    install_secret_masking(settings.secrets())
    return args.func(settings, args)


if __name__ == "__main__":
    sys.exit(main())
