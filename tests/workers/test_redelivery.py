"""The same message delivered twice changes nothing more; Dramatiq's retries replay, never repeat.

DESIGN.md "Rules that keep it correct": every actor is idempotent and
level-triggered (running it twice, late, or concurrently converges to the same
state, also with an admin change committed while it runs); every Stripe retry
replays the stored body with its idempotency key; after the last retry the
failure is visible on the row and in the admin API.
STYLE.md "Tests": a StubBroker and a Dramatiq worker in the test process for
retries; the real fake Stripe server and a real SMTP server behind them.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from typing import Any, Callable, Iterator

import pytest
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage, Middleware
from sqlalchemy import event, select
from sqlalchemy.engine import Engine

from billing.gateway import LedgerGateway
from billing.purchasing import PurchaseRunner
from billing.stripe_gateway import StripeGateway
from models.db import make_engine
from models.tables import Account, Invitation, Purchase, ScimGroup, ScimUser, SeatCount, SyncEvent, Tenant
from tests.conftest import connect_tenant
from tests.workers.support import (
    PRICES,
    Idp,
    SlowSmtp,
    bind_actors,
    caught_up,
    drain,
    expected_message_id,
    intercept,
    purchases,
    save_mapping,
    stripe_fake,
    subscription_posts,
    users_by_id,
)
from tests.workers.support import (
    licenses as licenses_of,
)
from workers import runtime
from workers.mail.transport import SmtpMailer
from workers.names import QUEUES
from workers.reconcile import Reconciler

GATEWAY_ATTEMPTS = 4  # StripeGateway's tenacity attempts per call (its default)


class Recorder(Middleware):
    """Keeps every message sent (not the retries Dramatiq schedules); may rewrite one before it is queued."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.retried: list[Any] = []
        self.rewrite: Callable[[Any], None] | None = None
        self.on_sent: Callable[[Any], None] | None = None
        self._delayed: Counter[str] = Counter()
        self._lock = threading.Lock()

    @staticmethod
    def is_retry(message, delay) -> bool:
        # Dramatiq's Retries middleware counts its retries in the options; a purchase is
        # also sent with a delay on purpose (STRIPE_UPDATE_SPACING), which is no retry.
        return bool(delay) and bool(message.options.get("retries"))

    def before_enqueue(self, broker, message, delay) -> None:
        if not self.is_retry(message, delay) and self.rewrite is not None:
            self.rewrite(message)

    def after_enqueue(self, broker, message, delay) -> None:
        retry = self.is_retry(message, delay)
        with self._lock:
            if message.queue_name.endswith(".DQ"):
                self._delayed[message.message_id] += 1
            elif self._delayed[message.message_id] > 0:
                # The worker moving a delayed message to its queue once due: not a new send.
                self._delayed[message.message_id] -= 1
                return
            (self.retried if retry else self.sent).append(message)
        if not retry and self.on_sent is not None:
            self.on_sent(message)

    def actors(self) -> Counter[str]:
        return Counter(message.actor_name for message in self.sent)


@dataclasses.dataclass
class Pipeline:
    broker: StubBroker
    actors: Any
    recorder: Recorder
    fake: Any
    smtp: SlowSmtp

    def drain(self) -> None:
        drain(self.broker, QUEUES)

    def deliver_again(self, messages: list[Any]) -> None:
        for message in messages:
            self.broker.enqueue(message)
        self.drain()


@pytest.fixture
def pipeline(admin, base_settings) -> Iterator[Pipeline]:
    """The real actors on a StubBroker with a 4-thread Dramatiq worker, over the test database and Redis."""
    with stripe_fake() as fake, SlowSmtp() as smtp:
        broker = StubBroker()
        broker.add_middleware(CurrentMessage())
        recorder = Recorder()
        broker.add_middleware(recorder)
        actors = bind_actors(broker)
        settings = dataclasses.replace(
            base_settings, stripe_api_key=fake.api_key, stripe_api_base=fake.url, stripe_prices=PRICES,
            smtp_url=smtp.url,
        )
        built = runtime.build(settings, broker, settings.redis_url)
        mailer = SmtpMailer(smtp.url, timeout=5, attempts=2, wait_seconds=0.01)
        # The worker's own gateway and mailer, with waits in milliseconds to keep the test quick.
        runtime.install(dataclasses.replace(
            built, gateway=StripeGateway(fake.api_key, PRICES, api_base=fake.url, wait_seconds=0.01), mailer=mailer))
        worker = Worker(broker, worker_threads=4, worker_timeout=50)
        worker.start()
        try:
            yield Pipeline(broker, actors, recorder, fake, smtp)
        finally:
            worker.stop()
            broker.close()
            mailer.close()
            built.engine.dispose()
            built.redis.close()
            runtime.install(None)  # type: ignore[arg-type]


def billed_tenant(admin, fake, sub: str, users: int, *, items: dict[str, int], tier: str | None = "team",
                  auto_invite: bool = True, no_address: int = 0) -> tuple[str, list[str], str]:
    """A tenant linked to a Stripe subscription, `users` users in one group (mapped once `tier` is given)."""
    fake.add_subscription(sub, customer=f"cus_{sub}", items=items)
    scim = connect_tenant(admin, f"Tenant {sub}", stripe_customer_id=f"cus_{sub}", stripe_subscription_id=sub)
    with Idp(scim.tenant_url, scim.token, concurrency=4) as idp:
        specs = [{"user_name": f"{sub}-{i}@acme.example", "emails": [{"value": f"{sub}-{i}@acme.example"}]}
                 for i in range(users - no_address)]
        specs += [{"user_name": f"{sub}-nomail-{i}"} for i in range(no_address)]
        ids = idp.create_users(specs)
        group = idp.create_group("Everyone")
        idp.add_memberships({group: ids})
    scim.client.close()
    if tier is not None:
        save_mapping(admin, scim.tenant_id, user_groups=[group], license_groups={tier: [group]},
                     auto_invite=auto_invite)
    return scim.tenant_id, ids, group


def rows(engine: Engine, tenant_id: str) -> dict[str, list[dict[str, Any]]]:
    """Every row the pipeline derives for a tenant (and the directory it reads), column by column."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table in (Tenant, ScimUser, ScimGroup, SyncEvent, Account, SeatCount, Purchase, Invitation):
        column = table.id if table is Tenant else table.tenant_id
        with engine.connect() as db:
            found = [dict(row._mapping) for row in db.execute(select(table.__table__).where(column == tenant_id))]
        key = [c.name for c in table.__table__.primary_key.columns]
        out[table.__tablename__] = sorted(found, key=lambda row: [str(row[k]) for k in key])
    return out


def changes(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Readable differences between two `rows` snapshots."""
    out = []
    for table, old_rows in before.items():
        new_rows = after[table]
        if len(old_rows) != len(new_rows):
            out.append(f"{table}: {len(old_rows)} rows became {len(new_rows)}")
            continue
        for old, new in zip(old_rows, new_rows, strict=True):
            out.extend(f"{table}.{col}: {old[col]!r} -> {new[col]!r}" for col in old if old[col] != new[col])
    return out


def outside_world(pipeline: Pipeline) -> tuple[Any, ...]:
    """What Stripe and the mail server received."""
    fake = pipeline.fake
    return (list(fake.calls), len(fake.updates), sorted(fake.invoices), pipeline.smtp.message_ids())


def test_every_message_delivered_twice_changes_nothing_more(admin, engine, pipeline):
    """Given a billed tenant whose pipeline ran once to the end (seats read, seats bought, invitations sent),
    When every message it sent (reconcile, purchase, invitations) and a seat read are delivered again,
    and then each actor function is called once more with the same arguments,
    Then no row changes, Stripe receives no request and the mail server no message.
    """
    t, ids, _ = billed_tenant(admin, pipeline.fake, "sub_twice", 5, items={"price_team": 1}, no_address=1)
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()
    sync = admin.get(f"/tenants/{t}/sync").json()
    assert caught_up(sync), sync
    assert {u["license"] for u in users_by_id(admin, t).values()} == {"team"}
    assert [p["status"] for p in purchases(admin, t)] == ["succeeded"]
    assert len(pipeline.smtp.messages) == 4
    sent = list(pipeline.recorder.sent)
    # The purchase read the subscription itself, so no separate seat read was needed.
    assert set(pipeline.recorder.actors()) == {"reconcile_tenant", "purchase_seats", "send_invitation"}
    state, world = rows(engine, t), outside_world(pipeline)

    pipeline.deliver_again(sent)
    # A late seat read, once the seats are known, does nothing either.
    pipeline.actors.sync_seats.send(t)
    pipeline.drain()

    assert changes(state, rows(engine, t)) == []
    assert outside_world(pipeline) == world, "no Stripe request, no mail"
    assert pipeline.broker.dead_letters == []

    for message in sent:
        pipeline.broker.get_actor(message.actor_name).fn(*message.args, **message.kwargs)

    assert changes(state, rows(engine, t)) == []
    assert outside_world(pipeline) == world


def test_one_purchase_delivered_three_times_at_once_buys_once(admin, engine, pipeline):
    """Given 6 users who need team seats (1 bought),
    When the purchase message is delivered three times at once to a 4-thread worker,
    Then Stripe executes one subscription update (a retry may replay it with the same key and body),
    one invoice is made, the purchase succeeded and every user holds a seat.
    """
    copies = []

    def duplicate(message) -> None:
        if message.actor_name == "purchase_seats" and not copies:
            copies.append(message)
            pipeline.broker.enqueue(message)
            pipeline.broker.enqueue(message)

    pipeline.recorder.on_sent = duplicate
    t, _, _ = billed_tenant(admin, pipeline.fake, "sub_thrice", 6, items={"price_team": 1})
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()

    assert pipeline.recorder.actors()["purchase_seats"] == 3
    posts = subscription_posts(pipeline.fake, "sub_thrice")
    assert {post.idempotency_key for post in posts} == {f"sally-purchase-{copies[0].args[0]}"}
    assert all(post.params == posts[0].params for post in posts)
    assert len(pipeline.fake.updates) == 1 and len(pipeline.fake.invoices) == 1
    [purchase] = purchases(admin, t)
    assert purchase["status"] == "succeeded" and purchase["stripe_invoice_id"] in pipeline.fake.invoices
    assert pipeline.fake.quantities("sub_thrice") == {"price_team": 6}
    assert {u["license"] for u in users_by_id(admin, t).values()} == {"team"}
    assert caught_up(admin.get(f"/tenants/{t}/sync").json())


def arm_on_purchase_read(pipeline: Pipeline, sub: str, failures: int, *, lose: bool = False) -> threading.Event:
    """Once armed, the subscription read that precedes a purchase queues faults for the `failures` requests
    that follow: Stripe 500s before any work, or (lose) answers lost after Stripe did the work."""
    armed = threading.Event()

    def hook(method: str, path: str, response):
        if armed.is_set() and method == "GET" and path == f"/v1/subscriptions/{sub}":
            armed.clear()
            if lose:
                pipeline.fake.lose_next_response(failures, path=f"/v1/subscriptions/{sub}")
            else:
                pipeline.fake.fail_next(failures, 500, path=f"/v1/subscriptions/{sub}")
        return response

    intercept(pipeline.fake, hook)
    return armed


def test_a_stripe_500_is_retried_by_dramatiq_replaying_the_same_key_and_body(admin, engine, pipeline):
    """Given a tenant whose seats were read, and Stripe answering 500 to every attempt of the purchase job's
    first delivery,
    When the admin maps 3 users to the team tier,
    Then Dramatiq retries the job, the retry replays the stored body with the same idempotency key,
    Stripe executes it once, and the purchase shows succeeded with its invoice.
    """
    t, ids, group = billed_tenant(admin, pipeline.fake, "sub_500", 3, items={"price_team": 1}, tier=None)
    save_mapping(admin, t, user_groups=[group])  # access first, no license: the seats are read, nothing bought
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()
    assert [call.method for call in pipeline.fake.calls] == ["GET"] and purchases(admin, t) == []

    armed = arm_on_purchase_read(pipeline, "sub_500", GATEWAY_ATTEMPTS)
    armed.set()
    save_mapping(admin, t, user_groups=[group], license_groups={"team": [group]})
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()

    posts = subscription_posts(pipeline.fake, "sub_500")
    assert len(posts) == GATEWAY_ATTEMPTS + 1
    assert len({post.idempotency_key for post in posts}) == 1
    assert all(post.params == posts[0].params for post in posts), "the retry replays the stored body verbatim"
    assert [message.actor_name for message in pipeline.recorder.retried] == ["purchase_seats"]
    assert len(pipeline.fake.updates) == 1 and len(pipeline.fake.invoices) == 1
    [purchase] = purchases(admin, t)
    assert (purchase["status"], purchase["error"]) == ("succeeded", None)
    assert purchase["stripe_invoice_id"] in pipeline.fake.invoices
    with engine.connect() as db:
        assert db.execute(select(Purchase.attempts)).scalar_one() == 2
    assert {u["license"] for u in users_by_id(admin, t).values()} == {"team"}


def test_a_purchase_still_failing_after_its_last_retry_shows_the_error(admin, engine, pipeline):
    """Given Stripe answering 500 to every attempt of a purchase job allowed one retry,
    When the retry fails too,
    Then the purchase stays pending with Stripe's error for the admin to see, the users wait as
    pending_license, nothing was bought; a later delivery (the sweep's) finishes it with the same key.
    """
    def one_quick_retry(message) -> None:
        if message.actor_name == "purchase_seats":
            message.options.update(max_retries=1, min_backoff=20, max_backoff=50)

    pipeline.recorder.rewrite = one_quick_retry
    t, ids, group = billed_tenant(admin, pipeline.fake, "sub_dead", 2, items={"price_team": 1}, tier=None)
    save_mapping(admin, t, user_groups=[group])
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()
    arm_on_purchase_read(pipeline, "sub_dead", 2 * GATEWAY_ATTEMPTS).set()
    save_mapping(admin, t, user_groups=[group], license_groups={"team": [group]})
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()

    [purchase] = purchases(admin, t)
    assert purchase["status"] == "pending" and "HTTP 500" in purchase["error"]
    sync = admin.get(f"/tenants/{t}/sync").json()
    assert sync["pending_purchases"] == 1 and not caught_up(sync)
    users = users_by_id(admin, t).values()
    assert sorted(u["status"] for u in users) == ["active", "pending_license"], "the one seat bought is used"
    assert [u["status_reason"] for u in users if u["license"] is None] == [
        "Waiting for the team seat purchase in progress."]
    assert pipeline.fake.updates == [] and len(pipeline.broker.dead_letters) == 1
    assert len(subscription_posts(pipeline.fake, "sub_dead")) == 2 * GATEWAY_ATTEMPTS

    pipeline.actors.purchase_seats.send(purchase["id"])
    pipeline.drain()
    assert purchases(admin, t)[0]["status"] == "succeeded"
    assert len({post.idempotency_key for post in subscription_posts(pipeline.fake, "sub_dead")}) == 1
    assert len(pipeline.fake.updates) == 1
    assert caught_up(admin.get(f"/tenants/{t}/sync").json())


def test_a_purchase_sent_to_stripe_is_never_recorded_as_not_billed_by_a_worker_without_a_key(
    admin, engine, pipeline
):
    """Given a purchase whose subscription update Stripe executed but whose answers were all lost
    (the job gave up with its body and key stored),
    When the purchase reaches a worker that has no STRIPE_API_KEY,
    Then it is not recorded as not_billed (the seats were charged): it stays pending, saying why;
    and a worker with the key settles it by replaying the key: succeeded, with Stripe's invoice.
    """
    def no_retry(message) -> None:
        if message.actor_name == "purchase_seats":
            message.options["max_retries"] = 0

    pipeline.recorder.rewrite = no_retry
    t, ids, group = billed_tenant(admin, pipeline.fake, "sub_keyless", 2, items={"price_team": 1}, tier=None)
    save_mapping(admin, t, user_groups=[group])
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()
    arm_on_purchase_read(pipeline, "sub_keyless", GATEWAY_ATTEMPTS, lose=True).set()
    save_mapping(admin, t, user_groups=[group], license_groups={"team": [group]})
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()
    [purchase] = purchases(admin, t)
    assert purchase["status"] == "pending" and len(pipeline.fake.updates) == 1, "Stripe did the work"

    outcome = PurchaseRunner(engine, LedgerGateway()).run(purchase["id"])  # what a worker without a key does

    assert outcome.status == "waiting_for_stripe"
    [purchase] = purchases(admin, t)
    assert purchase["status"] == "pending" and "STRIPE_API_KEY" in purchase["error"]
    assert licenses_of(admin, t)["team"]["purchased"] == 1
    pipeline.recorder.rewrite = None
    pipeline.actors.purchase_seats.send(purchase["id"])
    pipeline.drain()
    [purchase] = purchases(admin, t)
    assert (purchase["status"], purchase["stripe_invoice_id"]) == ("succeeded", sorted(pipeline.fake.invoices)[0])
    assert len(pipeline.fake.updates) == 1 and len(pipeline.fake.invoices) == 1
    assert licenses_of(admin, t)["team"] == {"purchased": 2, "assigned": 2}


def test_an_smtp_failure_is_retried_by_dramatiq_and_one_mail_arrives(admin, engine, pipeline):
    """Given a mail server that defers (451) every attempt of an invitation job's first delivery,
    When the job is retried by Dramatiq,
    Then exactly one mail arrives, with the tenant/user Message-ID, and invited_at is shown.
    """
    t, ids, _ = billed_tenant(admin, pipeline.fake, "sub_mail", 1, items={"price_team": 1})
    pipeline.smtp.fail_next(2, "451 4.3.0 Try again later")  # both attempts of the mailer
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()

    assert pipeline.smtp.message_ids() == [expected_message_id(t, ids[0])]
    assert [message.actor_name for message in pipeline.recorder.retried] == ["send_invitation"]
    user = users_by_id(admin, t)[ids[0]]
    assert user["invited_at"] and user["invite_error"] is None
    with engine.connect() as db:
        assert db.execute(select(Invitation.status, Invitation.attempts)).one() == ("sent", 2)


def test_an_invitation_failing_on_its_last_retry_shows_the_error_and_stays_failed(admin, engine, pipeline):
    """Given an invitation job on its last retry and a mail server that defers it,
    When the job fails,
    Then the admin sees invite_error (no invited_at), nothing is pending, and delivering the
    message again sends nothing.
    """
    from workers.actors import INVITE_RETRIES

    def last_retry(message) -> None:
        if message.actor_name == "send_invitation":
            message.options["retries"] = INVITE_RETRIES

    pipeline.recorder.rewrite = last_retry
    t, ids, _ = billed_tenant(admin, pipeline.fake, "sub_giveup", 1, items={"price_team": 1})
    pipeline.smtp.fail_next(2, "451 4.3.0 Try again later")
    pipeline.actors.reconcile_tenant.send(t)
    pipeline.drain()

    user = users_by_id(admin, t)[ids[0]]
    assert user["invited_at"] is None
    assert "gave up after" in user["invite_error"] and "451" in user["invite_error"]
    assert caught_up(admin.get(f"/tenants/{t}/sync").json())
    assert pipeline.smtp.messages == []
    invitation = [m for m in pipeline.recorder.sent if m.actor_name == "send_invitation"]
    pipeline.recorder.rewrite = None
    pipeline.deliver_again(invitation)
    assert pipeline.smtp.messages == []
    with engine.connect() as db:
        assert db.execute(select(Invitation.status)).scalar_one() == "failed"


def test_a_mapping_saved_while_a_reconcile_runs_is_applied_with_its_own_settings(admin, engine, base_settings):
    """Given a tenant with 3 users in a group, all applied, and a reconcile that has just started,
    When the admin saves the mapping (team license, auto-invite on, team cap 2) at that moment,
    Then the reconcile that applies that change applies it whole: 2 seats bought under the cap,
    1 user waiting with the cap as the reason, and all 3 invited.
    """
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: on SQLite the admin's write waits for the reconcile's write lock")
    scim = connect_tenant(admin, "Race")
    t = scim.tenant_id
    with Idp(scim.tenant_url, scim.token, concurrency=2) as idp:
        ids = idp.create_users({"user_name": f"r{i}@acme.example"} for i in range(3))
        group = idp.create_group("Team")
        idp.add_memberships({group: ids})
    scim.client.close()
    worker_engine = make_engine(base_settings.database_url)
    try:
        Reconciler(worker_engine, LedgerGateway()).run(t)
        saved: list[dict] = []

        def admin_saves_meanwhile(conn, cursor, statement, parameters, context, executemany) -> None:
            if not saved and statement.lstrip().upper().startswith("SELECT") and "sync_event.applied_at IS NULL" in statement:
                saved.append(save_mapping(admin, t, user_groups=[group], license_groups={"team": [group]},
                                          auto_invite=True, seat_cap={"team": 2}))

        event.listen(worker_engine, "before_cursor_execute", admin_saves_meanwhile)
        result = Reconciler(worker_engine, LedgerGateway()).run(t)
        event.remove(worker_engine, "before_cursor_execute", admin_saves_meanwhile)
        assert saved, "the admin's change was committed while the reconcile ran"
        assert result.purchase_id is not None
        PurchaseRunner(worker_engine, LedgerGateway()).run(result.purchase_id)
    finally:
        worker_engine.dispose()

    [purchase] = purchases(admin, t)
    assert (purchase["status"], purchase["quantities_after"]) == ("not_billed", {"starter": 0, "team": 2, "enterprise": 0})
    users = users_by_id(admin, t).values()
    assert sorted((u["status"], u["status_reason"]) for u in users) == [
        ("active", None), ("active", None), ("pending_license", "The team seat cap (2) is reached; the admin can raise it.")]
    sync = admin.get(f"/tenants/{t}/sync").json()
    assert sync["events_applied"] == sync["events_total"] and sync["pending_invitations"] == 3
