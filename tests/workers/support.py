"""Shared helpers of the end-to-end pipeline tests: a real `sally-scim worker`, the fakes, bounded waits.

A test drives the product the way a customer does: the IdP's SCIM requests
against the live server, the admin API, a real worker process on the real
broker, the fake Stripe server (through the real `stripe` library in the
worker) and a real SMTP server. It asserts what the admin API shows and what
Stripe and the mail server received.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import httpx
import pytest
from sqlalchemy import func, select

from billing.gateway import Gateway, LedgerGateway
from billing.purchasing import PurchaseRunner, sync_seats
from models.settings import Settings
from models.tables import Purchase, SyncEvent, utcnow
from tests.fakes.smtp_server import FakeSmtp
from tests.fakes.stripe_server import FakeStripe
from workers.invitations import send_invitations
from workers.mail.message import Mail, invitation_template
from workers.reconcile import Reconciler

ROOT = Path(__file__).resolve().parents[2]
PRICES = {"starter": "price_starter", "team": "price_team", "enterprise": "price_enterprise"}
UNIT_AMOUNTS = {"price_starter": 1000, "price_team": 2000, "price_enterprise": 5000}
TIERS = ("starter", "team", "enterprise")
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
READY_LINE = "Worker process is ready for action."
# Environment the worker must not inherit from the test runner (it gets its own below).
INHERITED_PREFIXES = ("DATABASE_URL", "TEST_DATABASE_URL", "REDIS_URL", "STRIPE_", "SMTP_URL", "SALLY_", "WORKER_",
                      "MAIL_FROM", "PUBLIC_BASE_URL", "dramatiq_")


def expected_message_id(tenant_id: str, user_id: str) -> str:
    """What CONTRACT.md promises: a Message-ID derived from tenant and user (ids are hex, so no escaping)."""
    return f"<invite.{tenant_id}.{user_id}@sally-scim.invalid>"


# -- the pipeline, driven directly over the SCIM API ---------------------------------


def make_user(client, name: str, active: bool = True) -> str:
    r = client.post("/Users", json={"schemas": [USER_SCHEMA], "userName": name, "active": active,
                                    "emails": [{"value": name, "primary": True}]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def make_group(client, name: str, members: list[str]) -> str:
    r = client.post("/Groups", json={"schemas": [GROUP_SCHEMA], "displayName": name,
                                     "members": [{"value": m} for m in members]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def users_by_name(admin, tenant_id: str) -> dict[str, dict]:
    return {u["userName"]: u for u in admin.get(f"/tenants/{tenant_id}/users").json()}


def settle_pipeline(engine, tenant_id: str, gw: Gateway | None = None) -> None:
    """Run reconcile and every purchase it plans until nothing is left (a calm worker)."""
    gw = gw or LedgerGateway()
    reconciler = Reconciler(engine, gw)
    for _ in range(20):
        result = reconciler.run(tenant_id)
        if result.needs_seat_sync:
            sync_seats(engine, gw, tenant_id)
        with engine.connect() as c:
            pending = [p for (p,) in c.execute(select(Purchase.id).where(Purchase.status == "pending"))]
        for purchase_id in pending:
            PurchaseRunner(engine, gw).run(purchase_id)
        with engine.connect() as c:
            left = c.execute(select(func.count()).select_from(SyncEvent).where(SyncEvent.applied_at.is_(None))).scalar()
            still = c.execute(select(func.count()).select_from(Purchase).where(Purchase.status == "pending")).scalar()
        if not left and not still:
            return
    raise AssertionError("the pipeline did not settle")


# -- the mail server ---------------------------------------------------------------


def build_invitation(*, mail_from: str, tenant_name: str, login_url: str, **render: Any) -> Mail:
    """One invitation as the worker builds it: the tenant's template, rendered for one user."""
    return invitation_template(mail_from=mail_from, tenant_name=tenant_name, login_url=login_url).render(**render)


def send_one(engine, mailer, settings: Settings, invitation_id: str, now: Callable[[], datetime] = utcnow) -> str:
    """Claim, send and record one invitation (a batch of one); raises its transient failure, as the job does."""
    result = send_invitations(engine, mailer, settings, [invitation_id], now=now)
    if result.error is not None:
        raise result.error
    return result.outcomes[invitation_id]



class SlowSmtp(FakeSmtp):
    """The recording SMTP server of test_mailer, optionally slow to say so once it has a message.

    With a delay, the message is recorded (queued) first and the 250 comes
    later: a worker that dies meanwhile never learns that the server took it,
    which is the one resend window DESIGN.md names.
    """

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.held: set[str] = set()
        self.held_refusals = 0

    def hold(self, addresses: Iterable[str]) -> None:
        """Take no mail for these addresses until release(): their RCPT is answered 451 (try again
        later), so the worker keeps them pending and retries, and none of its threads waits on us."""
        with self._lock:
            self.held |= {address.casefold() for address in addresses}

    def release(self) -> None:
        with self._lock:
            self.held.clear()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self._lock:
            held = address.casefold() in self.held
            self.held_refusals += held
        if held:
            return "451 4.7.1 Held by the test: try again later"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server, session, envelope):
        reply = await super().handle_DATA(server, session, envelope)
        if self.delay:
            await asyncio.sleep(self.delay)
        return reply

    def by_message_id(self) -> Counter[str]:
        return Counter(self.message_ids())

    def recipients(self) -> dict[str, set[str]]:
        """Message-ID → the addresses it was sent to."""
        out: dict[str, set[str]] = {}
        for message in list(self.messages):
            address = str(message["To"].addresses[0].addr_spec)
            out.setdefault(str(message["Message-ID"]), set()).add(address)
        return out


# -- Stripe ------------------------------------------------------------------------


def intercept(fake: FakeStripe, hook: Callable[[str, str, Any], Any]) -> None:
    """Let ``hook(method, path, response)`` see (and replace, or drop with None) each answer of the fake."""
    original = fake.handle

    def handle(method: str, raw_path: str, authorization: str | None, idempotency_key: str | None, body: str):
        response = original(method, raw_path, authorization, idempotency_key, body)
        return hook(method, raw_path.split("?")[0], response)

    fake.handle = handle  # type: ignore[method-assign]


def subscription_posts(fake: FakeStripe, subscription_id: str) -> list:
    return fake.posts(f"/v1/subscriptions/{subscription_id}")


def stripe_fake() -> FakeStripe:
    return FakeStripe(unit_amounts=UNIT_AMOUNTS)


# -- the worker process ----------------------------------------------------------------


def sally_scim_command() -> list[str]:
    script = Path(sys.executable).with_name("sally-scim")
    return [str(script)] if script.exists() else [sys.executable, "-m", "api.cli"]


@dataclass
class WorkerProcess:
    """`sally-scim worker` in its own process group, logging to a file; start, kill -9, start again."""

    settings: Settings
    var_dir: Path
    stripe: FakeStripe | None = None
    smtp: FakeSmtp | None = None
    sweep_interval: float = 1.0
    threads: int = 8
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.var_dir / "worker.log"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_PREFIXES)}
        env.update(
            DATABASE_URL=self.settings.database_url,
            REDIS_URL=self.settings.redis_url or "",
            SALLY_REDIS_NAMESPACE=self.settings.redis_namespace,
            SALLY_VAR_DIR=str(self.var_dir),
            SALLY_SWEEP_INTERVAL=str(self.sweep_interval),
            PUBLIC_BASE_URL=self.settings.public_base_url,
            WORKER_PROCESSES="1",
            WORKER_THREADS=str(self.threads),
            PYTHONUNBUFFERED="1",
        )
        if self.stripe is not None:
            env.update(
                STRIPE_API_KEY=self.stripe.api_key,
                STRIPE_API_BASE=self.stripe.url,
                **{f"STRIPE_PRICE_{tier.upper()}": price for tier, price in PRICES.items()},
            )
        if self.smtp is not None:
            env["SMTP_URL"] = self.smtp.url
        env.update(self.extra_env)
        return env

    def start(self, ready_within: float = 40.0) -> None:
        assert not self.alive, "the worker is already running"
        self.var_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts + 1} =====\n".encode())
            self.process = subprocess.Popen(
                [*sally_scim_command(), "worker"],
                env=self.environment(),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + ready_within
        while self.log().count(READY_LINE) < self.starts:
            if self.process.poll() is not None:
                pytest.fail(f"the worker exited with {self.process.returncode}\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the worker was not ready within {ready_within}s\n{self.tail()}")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the Dramatiq parent and its worker processes)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, chars: int = 12_000) -> str:
        return "----- worker log (tail) -----\n" + self.log()[-chars:]


# -- the admin's view -------------------------------------------------------------------


def caught_up(sync: dict[str, Any]) -> bool:
    return (
        sync["events_applied"] == sync["events_total"]
        and sync["pending_purchases"] == 0
        and sync["pending_invitations"] == 0
    )


def wait_until(
    check: Callable[[], Any], *, timeout: float, what: str, worker: WorkerProcess | None = None, interval: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the worker's log after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if worker is not None and worker.process is not None and not worker.alive:
            pytest.fail(f"the worker died while waiting for {what}\n{worker.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s (last: {last!r})\n{worker.tail() if worker else ''}")
        time.sleep(interval)


def wait_caught_up(
    admin: httpx.Client, tenant_id: str, *, timeout: float = 60.0, worker: WorkerProcess | None = None
) -> dict[str, Any]:
    """GET …/sync until the pipeline has caught up (CONTRACT.md), bounded."""
    state: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        response = admin.get(f"/tenants/{tenant_id}/sync")
        assert response.status_code == 200, response.text
        state.update(response.json())
        return dict(state) if caught_up(state) else None

    return wait_until(check, timeout=timeout, what=f"tenant {tenant_id} caught up", worker=worker)


def wait_seats_read(admin: httpx.Client, tenant_id: str, expected: dict[str, int], worker: WorkerProcess) -> None:
    """Wait until the worker has read the seats bought from the linked Stripe subscription."""

    def check() -> bool:
        seats = admin.get(f"/tenants/{tenant_id}/licenses").json()
        return {tier: seats[tier]["purchased"] for tier in TIERS} == expected

    wait_until(check, timeout=30, what="the seats bought read from Stripe", worker=worker)


def users_by_id(admin: httpx.Client, tenant_id: str, timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Every user of the tenant as the admin API lists them (one unpaged answer: give a 100,000-user
    tenant a longer `timeout` than the client's)."""
    response = admin.get(f"/tenants/{tenant_id}/users", **({"timeout": timeout} if timeout else {}))
    assert response.status_code == 200, response.text
    return {user["id"]: user for user in response.json()}


def licenses(admin: httpx.Client, tenant_id: str) -> dict[str, dict[str, int]]:
    response = admin.get(f"/tenants/{tenant_id}/licenses")
    assert response.status_code == 200, response.text
    return response.json()


def purchases(admin: httpx.Client, tenant_id: str) -> list[dict[str, Any]]:
    response = admin.get(f"/tenants/{tenant_id}/purchases")
    assert response.status_code == 200, response.text
    return response.json()


def save_mapping(admin: httpx.Client, tenant_id: str, **config: Any) -> dict[str, Any]:
    response = admin.put(f"/tenants/{tenant_id}/scim/config", json=config)
    assert response.status_code == 200, response.text
    return response.json()


PROMETHEUS_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$')


def metrics(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics, parsed: (name, labels) → value."""
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in response.text.splitlines():
        match = PROMETHEUS_LINE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        out[(match["name"], labels)] = float(match["value"])
    return out


def metric(snapshot: dict, name: str, **labels: str) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


# -- the IdP ---------------------------------------------------------------------------


class Idp:
    """What an IdP's provisioning cycle sends (Entra's shapes), over parallel connections."""

    def __init__(self, tenant_url: str, token: str, concurrency: int = 8) -> None:
        self.client = httpx.Client(
            base_url=tenant_url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"},
            timeout=60,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="idp")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()

    def __enter__(self) -> Idp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ok(self, response: httpx.Response, *statuses: int) -> httpx.Response:
        assert response.status_code in statuses, f"{response.request.method} {response.request.url}: {response.text}"
        return response

    def create_user(self, user_name: str, emails: Sequence[dict[str, Any]] = (), display_name: str | None = None) -> str:
        body: dict[str, Any] = {
            "schemas": [USER_SCHEMA],
            "externalId": f"ext-{user_name}",
            "userName": user_name,
            "active": True,
            "displayName": display_name or user_name.split("@")[0],
            "emails": list(emails),
        }
        return self._ok(self.client.post("/Users", json=body), 201).json()["id"]

    def create_users(self, specs: Iterable[dict[str, Any]]) -> list[str]:
        """Create users in parallel; the ids come back in the order of ``specs``."""
        return list(self.pool.map(lambda spec: self.create_user(**spec), list(specs)))

    def create_group(self, name: str) -> str:
        body = {"schemas": [GROUP_SCHEMA], "displayName": name, "externalId": f"ext-{name}", "members": []}
        return self._ok(self.client.post("/Groups", json=body), 201).json()["id"]

    def add_memberships(self, memberships: dict[str, Sequence[str]], chunk: int = 25) -> None:
        """Group id → user ids, all PATCHes in parallel across groups."""
        jobs = [(gid, ids[i:i + chunk]) for gid, ids in memberships.items() for i in range(0, len(ids), chunk)]

        def patch(job: tuple[str, Sequence[str]]) -> None:
            gid, ids = job
            body = {"schemas": [PATCH_SCHEMA],
                    "Operations": [{"op": "Add", "path": "members", "value": [{"value": uid} for uid in ids]}]}
            self._ok(self.client.patch(f"/Groups/{gid}", json=body), 200, 204)

        list(self.pool.map(patch, jobs))

    def remove_member(self, group_id: str, user_id: str) -> None:
        body = {"schemas": [PATCH_SCHEMA],
                "Operations": [{"op": "Remove", "path": f'members[value eq "{user_id}"]'}]}
        self._ok(self.client.patch(f"/Groups/{group_id}", json=body), 200, 204)

    def set_active(self, user_id: str, active: bool) -> None:
        """Entra sends the boolean as the string "False"/"True"."""
        body = {"schemas": [PATCH_SCHEMA],
                "Operations": [{"op": "Replace", "path": "active", "value": "True" if active else "False"}]}
        self._ok(self.client.patch(f"/Users/{user_id}", json=body), 200, 204)

    def delete_user(self, user_id: str) -> None:
        self._ok(self.client.delete(f"/Users/{user_id}"), 204)


# -- Dramatiq in the test process ------------------------------------------------------------


def bind_actors(broker) -> Any:
    """Set ``broker`` as Dramatiq's broker and (re)import workers.actors so every actor binds to it."""
    import dramatiq

    dramatiq.set_broker(broker)
    if "workers.actors" in sys.modules:
        return importlib.reload(sys.modules["workers.actors"])
    return importlib.import_module("workers.actors")


def drain(broker, queues: Sequence[str], timeout: float = 60.0) -> None:
    """Wait until every queue (delay queues included) is empty and nothing is in flight."""
    from dramatiq.common import dq_name

    deadline = time.monotonic() + timeout
    while True:
        for queue in queues:
            broker.join(queue, timeout=max(1, int((deadline - time.monotonic()) * 1000)), fail_fast=False)
        if all(
            broker.queues[name].unfinished_tasks == 0
            for queue in queues for name in (queue, dq_name(queue))
        ):
            return
        if time.monotonic() > deadline:
            pytest.fail("the stub broker's queues did not drain")

