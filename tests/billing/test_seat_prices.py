"""Each tier's Stripe price is kept beside the seats bought, where the worker reads the subscription.

The admin page's preview prices seats with it and never calls Stripe on the
request path (DESIGN.md "Stripe is never called on the request path").
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from billing.purchasing import PurchaseRunner, sync_seats
from billing.stripe_gateway import StripeGateway
from models.db import session_scope
from models.tables import Account, Purchase, ScimUser, SeatCount, Tenant, utcnow
from tests.fakes.stripe_server import FakeStripe

PRICES = {"starter": "price_starter", "team": "price_team", "enterprise": "price_enterprise"}
UNIT_AMOUNTS = {"price_starter": 900, "price_team": 1900}


@pytest.fixture
def fake():
    with FakeStripe(unit_amounts=UNIT_AMOUNTS) as server:
        server.add_subscription("sub_p", customer="cus_p", items={"price_starter": 2, "price_team": 1})
        yield server


@pytest.fixture
def gateway(fake):
    return StripeGateway(fake.api_key, PRICES, api_base=fake.url, attempts=2, wait_seconds=0.01)


def _tenant(engine) -> str:
    with session_scope(engine) as session:
        tenant = Tenant(name="Priced", stripe_customer_id="cus_p", stripe_subscription_id="sub_p")
        session.add(tenant)
        session.flush()
        return tenant.id


def _seats(engine, tenant_id: str) -> dict[str, tuple[int, int | None, str | None]]:
    with session_scope(engine) as session:
        rows = session.execute(select(SeatCount).where(SeatCount.tenant_id == tenant_id)).scalars()
        return {row.tier: (row.purchased, row.unit_amount, row.currency) for row in rows}


def test_reading_the_seats_keeps_each_tiers_price(clean_db, gateway):
    """Given a subscription with a starter (9.00 USD) and a team (19.00 USD) item and no enterprise item,
    When the worker reads the seats bought, Then seat_count has the quantities and those prices;
    enterprise, with no item, has no price."""
    tenant_id = _tenant(clean_db)
    assert sync_seats(clean_db, gateway, tenant_id) is not None
    assert _seats(clean_db, tenant_id) == {
        "starter": (2, 900, "usd"), "team": (1, 1900, "usd"), "enterprise": (0, None, None),
    }


def test_a_purchase_that_reads_the_subscription_keeps_the_prices_too(clean_db, gateway, fake):
    """Given a pending purchase for 3 team seats planned before the seats were ever read
    (for the 3 users waiting for one: demand is re-read before the freeze),
    When it runs, Then it buys them and the team price read on the way is kept."""
    tenant_id = _tenant(clean_db)
    with session_scope(clean_db) as session:
        for n in range(3):
            user = ScimUser(tenant_id=tenant_id, user_name=f"u{n}@example.com", user_name_key=f"u{n}@example.com")
            session.add(user)
            session.flush()
            session.add(Account(user_id=user.id, tenant_id=tenant_id, role="user", wanted_tier="team",
                                status="pending_license", waiting_since=utcnow()))
        session.flush()
        purchase = Purchase(tenant_id=tenant_id, status="pending", demand={"starter": 0, "team": 3, "enterprise": 0},
                            quantities_before={"starter": 0, "team": 0, "enterprise": 0}, enqueued_at=utcnow())
        session.add(purchase)
        session.flush()
        purchase_id = purchase.id
    assert PurchaseRunner(clean_db, gateway).run(purchase_id).status == "succeeded"
    seats = _seats(clean_db, tenant_id)
    assert seats["team"] == (3, 1900, "usd") and seats["starter"] == (2, 900, "usd")
