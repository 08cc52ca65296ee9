"""POST /stripe/webhook: Stripe's signature checked by the stripe library, each event applied once, in any order.

Issue 9 "Stripe webhooks". The events come from the fake Stripe, signed the
way Stripe signs them (HMAC-SHA256 over "t.payload" with the endpoint's
secret), and are posted to the real app in this process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import timedelta

import httpx
import pytest
import stripe
from sqlalchemy import func, select

from api.app import Services, create_app
from models.db import session_scope
from models.tables import Purchase, StripeEvent, SyncEvent, Tenant, utcnow
from tests.fakes.stripe_server import FakeStripe

PRICES = {"price_starter": 1000, "price_team": 2000}


@pytest.fixture
def fake():
    with FakeStripe(unit_amounts=PRICES) as server:
        server.add_subscription("sub_w", customer="cus_w", items={"price_starter": 2})
        yield server


@pytest.fixture
def woken():
    return []


@pytest.fixture
def app(base_settings, clean_db, woken):
    return create_app(base_settings, Services(clean_db, woken.append, lambda: True))


def post(app, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sally.test") as client:
            return await client.post("/stripe/webhook", content=body, headers=headers)

    return asyncio.run(send())


def deliver(app, fake: FakeStripe, event: dict, **how) -> httpx.Response:
    body, headers = fake.signed(event, **how)
    return post(app, body, headers)


def seed(engine, *, subscription: str | None = "sub_w") -> tuple[str, str]:
    """A tenant linked to the fake's subscription and one purchase that is being bought."""
    with session_scope(engine) as session:
        tenant = Tenant(name="Webhooks", stripe_customer_id="cus_w", stripe_subscription_id=subscription,
                        seats_synced_at=utcnow(), billing_status="verified")
        session.add(tenant)
        session.flush()
        purchase = Purchase(tenant_id=tenant.id, status="pending", demand={"starter": 5},
                            quantities_before={"starter": 2, "team": 0, "enterprise": 0})
        session.add(purchase)
        return tenant.id, purchase.id


def buy(fake: FakeStripe, purchase_id: str, starter: int) -> str:
    """What the worker's update does in Stripe: raise starter, billed at once, labelled with the purchase."""
    client = stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url}, max_network_retries=0)
    item = fake.subscription("sub_w")["items"]["data"][0]["id"]
    client.v1.subscriptions.update("sub_w", params={
        "items": [{"id": item, "quantity": starter}], "proration_behavior": "always_invoice",
        "metadata": {"sally_purchase_id": purchase_id},
    })
    return fake.subscription("sub_w")["latest_invoice"]


def purchase_of(engine, purchase_id: str) -> Purchase:
    with session_scope(engine) as session:
        return session.get(Purchase, purchase_id)


def events_stored(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(StripeEvent)).scalar_one()


def test_a_signed_invoice_paid_sets_the_purchase_payment(app, fake, clean_db):
    """Given a purchase whose update made an invoice, When Stripe's signed invoice.paid arrives,
    Then the purchase shows the invoice, paid, its amount, currency and paid time, and the event is stored."""
    _, purchase_id = seed(clean_db)
    invoice_id = buy(fake, purchase_id, 5)
    [paid] = fake.events_of("invoice.paid")

    response = deliver(app, fake, paid)

    assert response.status_code == 200, response.text
    assert response.json()["duplicate"] is False
    purchase = purchase_of(clean_db, purchase_id)
    assert (purchase.stripe_invoice_id, purchase.payment_status, purchase.invoice_status) == (invoice_id, "paid", "paid")
    assert (purchase.amount_due, purchase.amount_paid, purchase.currency) == (3 * 1000, 3 * 1000, "usd")
    assert purchase.paid_at is not None
    assert events_stored(clean_db) == 1


@pytest.mark.parametrize("how", ["wrong secret", "no header", "tampered body", "garbage header", "too old"])
def test_a_bad_or_missing_signature_is_400_and_changes_nothing(app, fake, clean_db, how):
    """Given a real invoice.paid event, When it arrives with a wrong, missing or garbled signature, a body
    changed after signing, or a signature older than Stripe's 5-minute tolerance (a replayed capture),
    Then the answer is 400 and nothing is stored or changed."""
    _, purchase_id = seed(clean_db)
    buy(fake, purchase_id, 5)
    [paid] = fake.events_of("invoice.paid")
    body, headers = fake.signed(paid)
    if how == "wrong secret":
        headers["Stripe-Signature"] = fake.sign(body, secret="whsec_someone_else")
    elif how == "no header":
        del headers["Stripe-Signature"]
    elif how == "tampered body":
        body = body.replace(b'"paid"', b'"void"')
    elif how == "garbage header":
        headers["Stripe-Signature"] = "t=abc,v1"
    else:
        headers["Stripe-Signature"] = fake.sign(body, timestamp=int(time.time()) - 3600)

    response = post(app, body, headers)

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_signature"
    purchase = purchase_of(clean_db, purchase_id)
    assert purchase.payment_status is None and purchase.stripe_invoice_id is None
    assert events_stored(clean_db) == 0


def test_a_redelivered_event_is_applied_once(app, fake, clean_db):
    """Given invoice.paid was applied, When Stripe delivers the same event again (at-least-once delivery)
    after a later payment_failed… Then the redelivery is a duplicate: it changes nothing and is stored once."""
    _, purchase_id = seed(clean_db)
    invoice_id = buy(fake, purchase_id, 5)
    [finalized] = fake.events_of("invoice.finalized")
    [paid] = fake.events_of("invoice.paid")
    assert deliver(app, fake, finalized).status_code == 200
    assert deliver(app, fake, paid).status_code == 200
    with session_scope(clean_db) as session:
        # Make a redelivery visible if it were applied again: pretend a later state.
        session.get(Purchase, purchase_id).payment_status = "failed"

    again = deliver(app, fake, paid)

    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert purchase_of(clean_db, purchase_id).payment_status == "failed"
    assert events_stored(clean_db) == 2
    assert purchase_of(clean_db, purchase_id).stripe_invoice_id == invoice_id


def test_events_out_of_order_never_move_a_payment_back(app, fake, clean_db):
    """Given invoice.finalized (open) and invoice.paid for one invoice, When paid arrives first and the older
    finalized after it, Then the purchase stays paid: an event older than the last applied one is ignored."""
    _, purchase_id = seed(clean_db)
    buy(fake, purchase_id, 5)
    [finalized] = fake.events_of("invoice.finalized")
    [paid] = fake.events_of("invoice.paid")
    assert finalized["created"] < paid["created"]

    assert deliver(app, fake, paid).status_code == 200
    late = deliver(app, fake, finalized)

    assert late.status_code == 200 and late.json()["outcome"].startswith("stale")
    purchase = purchase_of(clean_db, purchase_id)
    assert (purchase.payment_status, purchase.invoice_status) == ("paid", "paid")


def test_a_failed_payment_then_a_late_paid_ends_paid(app, fake, clean_db):
    """Given an open invoice whose first payment attempt fails and a later attempt succeeds,
    Then payment_failed shows "failed" until invoice.paid arrives, and paid is final."""
    _, purchase_id = seed(clean_db)
    fake.decline_payments("cus_w")
    client = stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url}, max_network_retries=0)
    item = fake.subscription("sub_w")["items"]["data"][0]["id"]
    # allow_incomplete: the update goes through, the invoice stays open (unpaid).
    client.v1.subscriptions.update("sub_w", params={
        "items": [{"id": item, "quantity": 4}], "proration_behavior": "always_invoice",
        "metadata": {"sally_purchase_id": purchase_id}})
    invoice_id = fake.subscription("sub_w")["latest_invoice"]
    failed = fake.fail_invoice_payment(invoice_id)
    paid = fake.pay_invoice(invoice_id)

    assert deliver(app, fake, failed).status_code == 200
    assert purchase_of(clean_db, purchase_id).payment_status == "failed"
    assert deliver(app, fake, paid).status_code == 200
    assert deliver(app, fake, failed, timestamp=None).json()["duplicate"] is True
    purchase = purchase_of(clean_db, purchase_id)
    assert (purchase.payment_status, purchase.amount_paid) == ("paid", 2 * 1000)


def test_a_subscription_change_asks_the_worker_to_reread_the_seats(app, fake, clean_db, woken):
    """Given a tenant whose seats were read, When customer.subscription.updated arrives for its subscription,
    Then its seats count as unread, an event enters its pipeline and the tenant is woken (the worker
    re-reads Stripe: the web process never calls Stripe); an event for an unknown subscription changes nothing."""
    tenant_id, _ = seed(clean_db)
    [updated] = [e for e in [fake.emit("customer.subscription.updated", fake.subscription("sub_w"))]]
    stranger = fake.emit("customer.subscription.updated", {**fake.subscription("sub_w"), "id": "sub_other"})

    assert deliver(app, fake, updated).status_code == 200
    assert deliver(app, fake, stranger).json()["outcome"].startswith("ignored")

    with session_scope(clean_db) as session:
        assert session.get(Tenant, tenant_id).seats_synced_at is None
        kinds = session.execute(select(SyncEvent.kind).where(SyncEvent.tenant_id == tenant_id)).scalars().all()
    assert kinds == ["stripe_subscription_changed"]
    assert woken == [tenant_id]
    assert fake.calls == [], "no Stripe call on the request path"


def test_an_unsigned_server_without_a_secret_refuses_every_event(base_settings, clean_db, fake):
    """Given no STRIPE_WEBHOOK_SECRET, Then every delivery is a 400 that says why, and nothing is stored."""
    settings = dataclasses.replace(base_settings, stripe_webhook_secret=None)
    app = create_app(settings, Services(clean_db, lambda _t: None, lambda: True))
    event = fake.emit("customer.subscription.updated", fake.subscription("sub_w"))

    response = deliver(app, fake, event)

    assert response.status_code == 400 and response.json()["error"] == "webhooks_disabled"
    assert events_stored(clean_db) == 0


@pytest.mark.parametrize("body", [b"[1, 2]", b'{"id": "evt_1", "type": "x", "created": "now", "data": {}}', b"\xff\xfe"])
def test_a_signed_body_that_is_not_an_event_is_400(app, fake, clean_db, body):
    """A correctly signed body that is not a Stripe event (or not UTF-8) is a 400, never a 500."""
    response = post(app, body, {"Stripe-Signature": fake.sign(body), "Content-Type": "application/json"})
    assert response.status_code == 400
    assert events_stored(clean_db) == 0


def test_the_event_store_keeps_when_and_what(app, fake, clean_db):
    """Each stored event keeps its type, object, tenant, Stripe's created time and what it did."""
    tenant_id, _ = seed(clean_db)
    event = fake.emit("customer.subscription.updated", fake.subscription("sub_w"))
    deliver(app, fake, event)
    with session_scope(clean_db) as session:
        row = session.get(StripeEvent, event["id"])
    assert (row.type, row.object_id, row.tenant_id, row.outcome) == (
        "customer.subscription.updated", "sub_w", tenant_id, "seats re-read requested")
    created = row.created if row.created.tzinfo else row.created.replace(tzinfo=utcnow().tzinfo)
    assert abs(created.timestamp() - event["created"]) < 1
    assert utcnow() - timedelta(minutes=1) < (row.received_at if row.received_at.tzinfo
                                             else row.received_at.replace(tzinfo=utcnow().tzinfo))
