"""The admin API's preview, user page, billing link and audit log (README "Admin API", issue 10)."""

from __future__ import annotations

from sqlalchemy import text

from billing.gateway import LedgerGateway
from billing.purchasing import PurchaseRunner
from tests.api.helpers import (
    assert_admin_error,
    count_rows,
    create_group,
    create_user,
    snapshot,
)
from tests.conftest import connect_tenant
from workers.reconcile import Reconciler

PIPELINE_TABLES = ("group_mapping", "sync_event", "account", "purchase", "seat_count", "audit_log", "tenant")


def _directory(tenant):
    """Three users: ada and bob in Staff and Team, cy in Staff only; a Starter group with bob."""
    ada = create_user(tenant.client, "ada@example.com")["id"]
    bob = create_user(tenant.client, "bob@example.com")["id"]
    cy = create_user(tenant.client, "cy@example.com")["id"]
    staff = create_group(tenant.client, "Staff", [ada, bob, cy])["id"]
    team = create_group(tenant.client, "Team", [ada, bob])["id"]
    starter = create_group(tenant.client, "Starter", [bob])["id"]
    return {"ada": ada, "bob": bob, "cy": cy, "staff": staff, "team": team, "starter": starter}


def test_preview_says_who_gains_access_and_what_seats_to_buy_and_changes_nothing(tenant, admin, clean_db):
    """Given a directory and no mapping yet
    When the admin POSTs …/scim/config/preview with the body of a PUT …/scim/config
    Then it answers who gains access, the lowest tier of each, the seats to buy per tier,
    "ledger_only" billing (no Stripe here) — and no row of any table changed."""
    d = _directory(tenant)
    body = {
        "user_groups": [d["staff"]],
        "license_groups": {"starter": [d["starter"]], "team": [d["team"]]},
        "auto_invite": True,
    }
    before = snapshot(clean_db, PIPELINE_TABLES)
    response = admin.post(f"/tenants/{tenant.tenant_id}/scim/config/preview", json=body)
    assert response.status_code == 200, response.text
    preview = response.json()
    gains = {c["userName"]: c for c in preview["gains_access"]}
    assert set(gains) == {"ada@example.com", "bob@example.com", "cy@example.com"}
    assert gains["bob@example.com"]["license_after"] == "starter"  # lowest tier wins
    assert gains["ada@example.com"]["license_after"] == "team"
    assert gains["cy@example.com"]["license_after"] is None
    assert preview["loses_access"] == []
    assert {tier: s["to_buy"] for tier, s in preview["seats"].items()} == {"starter": 1, "team": 1, "enterprise": 0}
    assert preview["billing"] == "ledger_only" and preview["total"] == []
    assert snapshot(clean_db, PIPELINE_TABLES) == before


def test_preview_after_the_pipeline_ran_shows_losses_and_tier_changes(tenant, admin, clean_db):
    """Given a saved mapping the pipeline has applied
    When a preview drops the Team license group and moves Staff to admins only
    Then ada's tier changes team → none and cy, in no mapped group any more, loses access."""
    d = _directory(tenant)
    saved = admin.put(
        f"/tenants/{tenant.tenant_id}/scim/config",
        json={"user_groups": [d["staff"]], "license_groups": {"starter": [d["starter"]], "team": [d["team"]]}},
    )
    assert saved.status_code == 200, saved.text
    planned = Reconciler(clean_db, LedgerGateway()).run(tenant.tenant_id)
    # The purchase it planned settles as not_billed (no Stripe here): 1 starter and 1 team seat bought.
    assert PurchaseRunner(clean_db, LedgerGateway()).run(planned.purchase_id).status == "not_billed"
    admin_only = create_group(tenant.client, "Admins", [d["ada"], d["bob"]])["id"]
    preview = admin.post(
        f"/tenants/{tenant.tenant_id}/scim/config/preview",
        json={"admin_groups": [admin_only], "license_groups": {"starter": [d["starter"]]}},
    ).json()
    assert [c["userName"] for c in preview["loses_access"]] == ["cy@example.com"]
    assert {c["userName"]: (c["license_before"], c["license_after"]) for c in preview["license_changes"]} == {
        "ada@example.com": ("team", None)
    }
    assert {c["userName"] for c in preview["role_changes"]} == {"ada@example.com", "bob@example.com"}
    assert preview["seats"]["starter"]["to_buy"] == 0  # bob's seat was bought by the first pass


def test_preview_validates_like_put(tenant, admin, clean_db):
    """An unknown group id or a bad body is the same 400 as for PUT …/scim/config."""
    assert_admin_error(
        admin.post(f"/tenants/{tenant.tenant_id}/scim/config/preview", json={"user_groups": ["nope"]}), 400, "unknown_group"
    )
    assert_admin_error(
        admin.post(f"/tenants/{tenant.tenant_id}/scim/config/preview", json={"seat_cap": {"team": -1}}), 400, "invalid_body"
    )
    assert_admin_error(admin.post("/tenants/unknown/scim/config/preview", json={}), 404, "not_found")


def test_a_user_shows_groups_what_gave_role_and_tier_and_history_newest_first(tenant, admin, clean_db):
    """Given bob in Staff (user group), Team and Starter (license groups), the pipeline run
    When the admin GETs …/users/{bob}
    Then it lists his groups with how each is mapped, Staff gave the role and Starter the tier,
    and his history: the SCIM writes naming him and the pipeline's outcome, newest first."""
    d = _directory(tenant)
    admin.put(
        f"/tenants/{tenant.tenant_id}/scim/config",
        json={"user_groups": [d["staff"]], "license_groups": {"starter": [d["starter"]], "team": [d["team"]]}},
    )
    Reconciler(clean_db, LedgerGateway()).run(tenant.tenant_id)
    response = admin.get(f"/tenants/{tenant.tenant_id}/users/{d['bob']}")
    assert response.status_code == 200, response.text
    bob = response.json()
    assert bob["userName"] == "bob@example.com" and bob["role"] == "user"
    assert {g["displayName"]: g["mapped_as"] for g in bob["groups"]} == {
        "Staff": ["user"], "Starter": ["starter"], "Team": ["team"]
    }
    assert bob["role_from"] == ["Staff"] and bob["license_from"] == ["Starter"]
    history = bob["history"]
    assert [h["at"] for h in history] == sorted((h["at"] for h in history), reverse=True)
    scim_kinds = [h["kind"] for h in history if h["source"] == "scim"]
    assert scim_kinds == ["group_created", "group_created", "group_created", "user_created"]
    outcomes = [h for h in history if h["source"] == "pipeline"]
    assert outcomes and outcomes[0]["status"] in ("active", "pending_license")
    # cy's history does not carry bob's events.
    cy = admin.get(f"/tenants/{tenant.tenant_id}/users/{d['cy']}").json()
    assert [h["kind"] for h in cy["history"] if h["source"] == "scim"] == ["group_created", "user_created"]
    assert_admin_error(admin.get(f"/tenants/{tenant.tenant_id}/users/nope"), 404, "not_found")


def test_every_admin_action_is_audited_in_its_transaction(admin, clean_db):
    """When the admin creates a tenant with billing, connects SCIM, rotates, saves a mapping,
    removes a user and disconnects, Then GET …/audit lists each, newest first, by "admin token",
    and no token appears in it."""
    scim = connect_tenant(admin, stripe_customer_id="cus_1", stripe_subscription_id="sub_1")
    user = create_user(scim.client, "ada@example.com")["id"]
    rotated = admin.post(f"/tenants/{scim.tenant_id}/scim/token").json()["token"]
    assert admin.put(f"/tenants/{scim.tenant_id}/scim/config", json={"auto_invite": True}).status_code == 200
    assert admin.delete(f"/tenants/{scim.tenant_id}/scim").status_code == 204
    assert admin.delete(f"/tenants/{scim.tenant_id}/users/{user}").status_code == 204
    response = admin.get(f"/tenants/{scim.tenant_id}/audit")
    assert response.status_code == 200, response.text
    entries = response.json()
    assert [e["action"] for e in entries] == [
        "user_removed", "scim_disconnected", "mapping_saved", "token_rotated", "scim_connected",
        "billing_linked", "tenant_created",
    ]
    assert {e["actor"] for e in entries} == {"admin token"}
    assert entries[0]["detail"]["userName"] == "ada@example.com"
    assert scim.token not in response.text and rotated not in response.text
    scim.client.close()


def test_a_refused_action_writes_no_audit_row(tenant, admin, clean_db):
    """Given a mapping with an unknown group, When it is PUT, Then 400 and no audit row (same transaction)."""
    before = count_rows(clean_db, "audit_log")
    assert_admin_error(admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json={"user_groups": ["x"]}), 400)
    assert count_rows(clean_db, "audit_log") == before


def test_link_billing_later(tenant, admin, clean_db):
    """Given a tenant created without billing, When the admin PUTs …/billing with Stripe ids,
    Then they are stored unverified (202: a worker checks them), a sync event asks the worker
    to read the seats, and it is audited; a half-filled body is a 400 that changes nothing,
    and another tenant cannot take the same subscription (409)."""
    assert_admin_error(admin.put(f"/tenants/{tenant.tenant_id}/billing", json={"stripe_customer_id": "cus_9"}), 400)
    assert admin.get(f"/tenants/{tenant.tenant_id}/audit").json()[0]["action"] != "billing_linked"
    response = admin.put(
        f"/tenants/{tenant.tenant_id}/billing", json={"stripe_customer_id": "cus_9", "stripe_subscription_id": "sub_9"}
    )
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer == admin.get(f"/tenants/{tenant.tenant_id}/billing").json()
    assert (answer["stripe_customer_id"], answer["stripe_subscription_id"], answer["status"]) == (
        "cus_9", "sub_9", "unverified"
    )
    with clean_db.connect() as connection:
        row = connection.execute(
            text("SELECT stripe_subscription_id, seats_synced_at FROM tenant WHERE id = :t"), {"t": tenant.tenant_id}
        ).one()
    assert row == ("sub_9", None)
    assert count_rows(clean_db, "sync_event", "tenant_id = :t AND kind = 'billing_linked'", t=tenant.tenant_id) == 1
    assert admin.get(f"/tenants/{tenant.tenant_id}/audit").json()[0]["action"] == "billing_linked"
    other = admin.post("/tenants", json={"name": "Other"}).json()["tenant_id"]
    taken = admin.put(f"/tenants/{other}/billing", json={"stripe_customer_id": "cus_9", "stripe_subscription_id": "sub_9"})
    assert_admin_error(taken, 409)
    assert taken.json()["error"] == "subscription_in_use"
    assert [row["action"] for row in admin.get(f"/tenants/{other}/audit").json()] == ["tenant_created"]


def test_tenants_are_listed(admin, clean_db):
    a = connect_tenant(admin, "Alpha")
    b = connect_tenant(admin, "Beta")
    listed = admin.get("/tenants").json()
    assert [(t["name"], t["scim_enabled"], t["provider"]) for t in listed] == [
        ("Alpha", True, "entra"), ("Beta", True, "entra")
    ]
    a.client.close()
    b.client.close()


def test_seats_a_pending_purchase_is_buying_are_not_counted_twice(tenant, admin, clean_db):
    """Given a saved mapping whose purchase (1 starter, 1 team) is planned but not settled yet
    When the admin previews the same mapping
    Then no seat is to buy: the purchase in flight already covers them."""
    d = _directory(tenant)
    body = {"user_groups": [d["staff"]], "license_groups": {"starter": [d["starter"]], "team": [d["team"]]}}
    assert admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json=body).status_code == 200
    planned = Reconciler(clean_db, LedgerGateway()).run(tenant.tenant_id)
    assert planned.purchase_id is not None
    preview = admin.post(f"/tenants/{tenant.tenant_id}/scim/config/preview", json=body).json()
    assert {tier: s["to_buy"] for tier, s in preview["seats"].items()} == {"starter": 0, "team": 0, "enterprise": 0}
    assert preview["gains_access"] == [] and preview["loses_access"] == []


def test_the_command_line_is_audited_too(admin, base_settings, clean_db):
    """`sally-scim tenant create` writes the same audit rows, by "command line"."""
    from api.cli import create_tenant_with_scim

    created = create_tenant_with_scim(base_settings, "Cli Co", "okta", None, None)
    entries = admin.get(f"/tenants/{created['tenant_id']}/audit").json()
    assert [(e["action"], e["actor"]) for e in entries] == [
        ("scim_connected", "command line"), ("tenant_created", "command line")
    ]
    assert created["token"] not in str(entries)
