"""The pipeline's logic, driven directly: reconcile, seat allocation, the purchase protocol."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from billing.stripe_gateway import StripeGateway
from models.tables import Invitation
from tests.conftest import connect_tenant
from tests.fakes.stripe_server import FakeStripe
from tests.workers.support import make_group, make_user, settle_pipeline, users_by_name

PRICES = {"starter": "price_starter", "team": "price_team", "enterprise": "price_enterprise"}
USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"


@pytest.fixture
def stripe_fake():
    with FakeStripe(unit_amounts={"price_starter": 1000, "price_team": 2000, "price_enterprise": 5000}) as fake:
        yield fake


def gateway(fake: FakeStripe) -> StripeGateway:
    return StripeGateway(fake.api_key, PRICES, api_base=fake.url, wait_seconds=0.01)


def test_roles_and_lowest_tier_with_ledger_only_billing(admin, tenant, engine):
    """Given users in user/admin/license groups, when the mapping is saved and reconciled,
    then access comes from groups only, admin wins, the lowest tier wins, and seats are recorded not_billed."""
    c = tenant.client
    ann, bob, cid, dan = (make_user(c, f"{n}@x.com") for n in ("ann", "bob", "cid", "dan"))
    users = make_group(c, "Users", [ann, bob, cid])
    admins = make_group(c, "Admins", [bob])
    starter = make_group(c, "Starter", [ann, dan])
    team = make_group(c, "Team", [ann, bob])
    r = admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json={
        "user_groups": [users], "admin_groups": [admins],
        "license_groups": {"starter": [starter], "team": [team]}, "auto_invite": True})
    assert r.status_code == 200, r.text
    settle_pipeline(engine, tenant.tenant_id)
    seen = users_by_name(admin, tenant.tenant_id)
    assert (seen["ann@x.com"]["role"], seen["ann@x.com"]["license"]) == ("user", "starter")
    assert (seen["bob@x.com"]["role"], seen["bob@x.com"]["license"]) == ("admin", "team")
    assert (seen["cid@x.com"]["role"], seen["cid@x.com"]["license"], seen["cid@x.com"]["status"]) == ("user", None, "active")
    assert (seen["dan@x.com"]["role"], seen["dan@x.com"]["status"]) == (None, "no_access")
    licenses = admin.get(f"/tenants/{tenant.tenant_id}/licenses").json()
    assert licenses == {"starter": {"purchased": 1, "assigned": 1}, "team": {"purchased": 1, "assigned": 1},
                        "enterprise": {"purchased": 0, "assigned": 0}}
    purchases = admin.get(f"/tenants/{tenant.tenant_id}/purchases").json()
    assert [p["status"] for p in purchases] == ["not_billed"]
    assert purchases[0]["quantities_after"] == {"starter": 1, "team": 1, "enterprise": 0}
    with engine.connect() as conn:
        invited = sorted(a for (a,) in conn.execute(select(Invitation.address)))
    assert invited == ["ann@x.com", "bob@x.com", "cid@x.com"]
    sync = admin.get(f"/tenants/{tenant.tenant_id}/sync").json()
    assert sync["events_total"] == sync["events_applied"] and sync["pending_purchases"] == 0
    assert sync["pending_invitations"] == 3


def test_seats_bought_in_stripe_once_and_never_lowered(admin, engine, stripe_fake):
    """Given a tenant with a Stripe subscription of 1 team seat, when 5 users need team seats,
    then one subscription update raises team to 5 with always_invoice, and the invoice is recorded."""
    stripe_fake.add_subscription("sub_1", customer="cus_1", items={"price_team": 1, "price_starter": 7})
    scim = connect_tenant(admin, "Billed", stripe_customer_id="cus_1", stripe_subscription_id="sub_1")
    ids = [make_user(scim.client, f"u{i}@x.com") for i in range(5)]
    group = make_group(scim.client, "All", ids)
    admin.put(f"/tenants/{scim.tenant_id}/scim/config",
              json={"user_groups": [group], "license_groups": {"team": [group]}})
    settle_pipeline(engine, scim.tenant_id, gateway(stripe_fake))
    posts = stripe_fake.posts("/v1/subscriptions")
    assert len(posts) == 1
    assert stripe_fake.quantities("sub_1") == {"price_team": 5, "price_starter": 7}
    purchase = admin.get(f"/tenants/{scim.tenant_id}/purchases").json()[0]
    assert purchase["status"] == "succeeded" and purchase["stripe_invoice_id"].startswith("in_")
    assert purchase["quantities_before"] == {"starter": 7, "team": 1, "enterprise": 0}
    assert purchase["quantities_after"] == {"starter": 7, "team": 5, "enterprise": 0}
    assert {u["license"] for u in users_by_name(admin, scim.tenant_id).values()} == {"team"}
    # Deprovision two: seats stay bought, licenses are freed.
    for user_id in ids[:2]:
        assert scim.client.delete(f"/Users/{user_id}").status_code == 204
    settle_pipeline(engine, scim.tenant_id, gateway(stripe_fake))
    assert admin.get(f"/tenants/{scim.tenant_id}/licenses").json()["team"] == {"purchased": 5, "assigned": 3}
    assert len(stripe_fake.posts("/v1/subscriptions")) == 1
    scim.client.close()
