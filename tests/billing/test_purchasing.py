"""The purchase protocol against Stripe's limits (issue 9), driven directly with the fake Stripe.

An idempotency key older than 20 h is never replayed; a purchase in flight is
leased; demand and caps are re-read right before the request is frozen; a
refused API key is the operator's problem, not the tenant's.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import stripe
from sqlalchemy import select, update

from billing.purchasing import PurchaseRunner, sync_seats
from billing.stripe_gateway import PermanentBillingError, StripeGateway, TransientBillingError
from models.db import session_scope
from models.tables import Purchase, utcnow
from tests.conftest import connect_tenant
from tests.fakes.stripe_server import FakeStripe
from workers.reconcile import Reconciler

PRICES = {"starter": "price_starter", "team": "price_team", "enterprise": "price_enterprise"}
USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"


@pytest.fixture
def fake():
    with FakeStripe(unit_amounts={"price_starter": 1000, "price_team": 2000}) as server:
        server.add_subscription("sub_k", customer="cus_k", items={"price_team": 2})
        yield server


def gateway(fake: FakeStripe, attempts: int = 2) -> StripeGateway:
    return StripeGateway(fake.api_key, PRICES, api_base=fake.url, attempts=attempts, wait_seconds=0.01)


class Clock:
    """A clock the test moves forward."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self):
        return self.now


def planned(admin, engine, fake, users: int) -> tuple[str, str, list[str]]:
    """A billed tenant (2 team seats read) whose `users` team users have made a purchase pending."""
    scim = connect_tenant(admin, "Keys", stripe_customer_id="cus_k", stripe_subscription_id="sub_k")
    # Linked: the worker reads (and checks) the subscription first.
    assert Reconciler(engine, gateway(fake)).run(scim.tenant_id).needs_seat_sync
    sync_seats(engine, gateway(fake), scim.tenant_id)
    ids = []
    for i in range(users):
        answer = scim.client.post("/Users", json={"schemas": [USER], "userName": f"k{i}@x.com"})
        ids.append(answer.json()["id"])
    group = scim.client.post("/Groups", json={"schemas": [GROUP], "displayName": "Team",
                                              "members": [{"value": uid} for uid in ids]}).json()["id"]
    scim.client.close()
    admin.put(f"/tenants/{scim.tenant_id}/scim/config", json={"user_groups": [group], "license_groups": {"team": [group]}})
    Reconciler(engine, gateway(fake)).run(scim.tenant_id)
    with engine.connect() as connection:
        [purchase_id] = connection.execute(select(Purchase.id).where(Purchase.status == "pending")).scalars().all()
    return scim.tenant_id, purchase_id, ids


def purchase(engine, purchase_id: str) -> Purchase:
    with session_scope(engine) as session:
        return session.get(Purchase, purchase_id)


def test_a_key_older_than_20_hours_is_never_replayed_when_stripe_did_the_work(admin, clean_db, fake):
    """Given a purchase whose update Stripe executed but whose answers were all lost (the job gave up),
    When it runs again 21 hours later (Stripe keeps keys 24 h; we never get near that),
    Then the old key is not sent again: the worker re-reads the subscription, finds the seats bought,
    and settles the purchase as succeeded with the invoice that update made — one update, one invoice."""
    clock = Clock()
    t, purchase_id, _ = planned(admin, clean_db, fake, 5)
    fake.lose_next_response(2, path="/v1/subscriptions/sub_k", method="POST")
    runner = PurchaseRunner(clean_db, gateway(fake), clock=clock)
    with pytest.raises(TransientBillingError):
        runner.run(purchase_id)
    old_key = purchase(clean_db, purchase_id).idempotency_key
    assert len(fake.updates) == 1 and purchase(clean_db, purchase_id).status == "pending"

    clock.now += timedelta(hours=21)
    outcome = runner.run(purchase_id)

    assert outcome.status == "succeeded"
    settled = purchase(clean_db, purchase_id)
    [invoice_id] = list(fake.invoices)
    assert (settled.status, settled.stripe_invoice_id, settled.amount_due) == ("succeeded", invoice_id, 3 * 2000)
    assert settled.quantities_after["team"] == 5
    posts = fake.posts("/v1/subscriptions/sub_k")
    assert {p.idempotency_key for p in posts} == {old_key}, "the expired key was not replayed after 20 h"
    assert len(posts) == 2 and len(fake.updates) == 1


def test_a_key_older_than_20_hours_is_replanned_with_a_new_key(admin, clean_db, fake):
    """Given a purchase whose update never reached Stripe (a 500 before any work, every attempt),
    When it runs again 21 hours later, after finance raised team to 3 by hand,
    Then it re-reads the subscription, re-plans from 3 with a new key, and buys once."""
    clock = Clock()
    t, purchase_id, _ = planned(admin, clean_db, fake, 5)
    fake.fail_next(2, 500, path="/v1/subscriptions/sub_k", method="POST")
    runner = PurchaseRunner(clean_db, gateway(fake), clock=clock)
    with pytest.raises(TransientBillingError):
        runner.run(purchase_id)
    old_key = purchase(clean_db, purchase_id).idempotency_key
    item = fake.subscription("sub_k")["items"]["data"][0]["id"]
    stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url}, max_network_retries=0).v1.subscriptions.update(
        "sub_k", params={"items": [{"id": item, "quantity": 3}]})

    clock.now += timedelta(hours=21)
    assert runner.run(purchase_id).status == "succeeded"

    settled = purchase(clean_db, purchase_id)
    assert settled.idempotency_key != old_key and settled.idempotency_key.startswith(old_key + "-r")
    assert settled.quantities_before["team"] == 3 and settled.quantities_after["team"] == 5
    sally_posts = [p for p in fake.posts("/v1/subscriptions/sub_k") if (p.idempotency_key or "").startswith("sally-")]
    assert [p.idempotency_key for p in sally_posts] == [old_key, old_key, settled.idempotency_key]
    assert fake.quantities("sub_k") == {"price_team": 5}
    assert len(fake.invoices) == 1 and fake.invoices[settled.stripe_invoice_id]["amount_due"] == 2 * 2000


def test_a_purchase_in_flight_is_not_run_twice_while_its_lease_runs(admin, clean_db, fake):
    """Given a worker holds a purchase's lease (it is talking to Stripe), When a second delivery of the
    same purchase runs, Then it leaves it alone (no Stripe call); once the lease lapsed, it runs."""
    clock = Clock()
    t, purchase_id, _ = planned(admin, clean_db, fake, 5)
    with session_scope(clean_db) as session:
        session.execute(update(Purchase).where(Purchase.id == purchase_id)
                        .values(lease_until=clock.now + timedelta(seconds=30)))
    runner = PurchaseRunner(clean_db, gateway(fake), clock=clock)
    calls = len(fake.calls)

    assert runner.run(purchase_id).status == "in_flight"
    assert len(fake.calls) == calls

    clock.now += timedelta(seconds=31)
    assert runner.run(purchase_id).status == "succeeded"
    assert purchase(clean_db, purchase_id).lease_until is None


def test_demand_is_reread_right_before_the_request_is_frozen(admin, clean_db, fake):
    """Given a purchase planned for 6 team users (2 seats bought), When 3 of them lose access before the
    purchase job runs, Then the request raises team to 3, not 6: a purchase never buys for users who are gone."""
    t, purchase_id, ids = planned(admin, clean_db, fake, 6)
    assert purchase(clean_db, purchase_id).demand["team"] == 6
    for user_id in ids[:3]:
        assert admin.delete(f"/tenants/{t}/users/{user_id}").status_code == 204
    Reconciler(clean_db, gateway(fake)).run(t)
    assert purchase(clean_db, purchase_id).status == "pending", "still the same purchase, not yet frozen"

    PurchaseRunner(clean_db, gateway(fake)).run(purchase_id)

    settled = purchase(clean_db, purchase_id)
    assert settled.quantities_after["team"] == 3 and fake.quantities("sub_k") == {"price_team": 3}


def test_a_refused_api_key_keeps_the_purchase_pending_and_the_tenant_unblocked(admin, clean_db, fake):
    """Given Stripe answers 401 (our API key was revoked), When the purchase runs,
    Then the error says so and propagates (the actor raises the operator alert and retries), the purchase
    stays pending and the tenant is not blocked; with the key fixed, the next run buys."""
    t, purchase_id, _ = planned(admin, clean_db, fake, 5)
    wrong = StripeGateway("sk_test_revoked_000", PRICES, api_base=fake.url, attempts=1)

    with pytest.raises(PermanentBillingError) as caught:
        PurchaseRunner(clean_db, wrong).run(purchase_id)

    assert caught.value.is_auth
    pending = purchase(clean_db, purchase_id)
    assert pending.status == "pending" and pending.lease_until is None and "401" in pending.error
    assert "sk_test_revoked_000" not in pending.error
    assert admin.get(f"/tenants/{t}/purchases").json()[0]["status"] == "pending"
    assert PurchaseRunner(clean_db, gateway(fake)).run(purchase_id).status == "succeeded"


def test_the_guard_holds_at_the_freeze_when_stripe_shows_fewer_seats(admin, clean_db, fake):
    """Given a purchase planned from 2 team seats for 12 users (growth 10: within max(10, 25 %)), When finance
    lowered team to 0 by hand meanwhile (no webhook), Then the worker's read shows growth 12 at the freeze:
    the purchase is held for approval and nothing is bought."""
    t, purchase_id, _ = planned(admin, clean_db, fake, 12)
    admin.put(f"/tenants/{t}/scim/config", json={
        **{k: v for k, v in admin.get(f"/tenants/{t}/scim/config").json().items() if k != "spend_guard"},
        "spend_guard": {"first_purchase_seats": 0}})
    item = fake.subscription("sub_k")["items"]["data"][0]["id"]
    stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url}, max_network_retries=0).v1.subscriptions.update(
        "sub_k", params={"items": [{"id": item, "quantity": 0}]})

    outcome = PurchaseRunner(clean_db, gateway(fake)).run(purchase_id)

    held = purchase(clean_db, purchase_id)
    assert outcome.status == "awaiting_approval" and held.status == "awaiting_approval"
    assert "finance lowered team to 0" in held.hold_reason
    assert held.request_body is None
    assert [p for p in fake.posts() if (p.idempotency_key or "").startswith("sally-")] == []
