"""The admin API under /admin/api (CONTRACT.md "Admin API")."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from sqlalchemy import text

from tests.api.helpers import (
    assert_admin_error,
    assert_scim_error,
    count_rows,
    create_group,
    create_user,
    events,
    plain_client,
    scim_client,
    snapshot,
    sync_counts,
)
from tests.conftest import ADMIN_TOKEN, connect_tenant

PROVIDERS = ["entra", "google", "okta", "onelogin", "pingone"]


# ------------------------------------------------------------------ tenants and connection


def test_create_tenant(admin, clean_db):
    """Given the admin token
    When the admin POSTs /tenants with a name
    Then it gets 201 {"tenant_id"}; SCIM is not connected yet (enabled false, no provider)."""
    response = admin.post("/tenants", json={"name": "Acme"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"tenant_id"} and isinstance(body["tenant_id"], str) and body["tenant_id"]
    scim = admin.get(f"/tenants/{body['tenant_id']}/scim").json()
    assert scim["enabled"] is False
    assert scim["provider"] is None
    assert scim["last_request_at"] is None


@pytest.mark.parametrize(
    "body",
    [{}, {"name": ""}, {"name": "   "}, {"name": None}, {"name": 5}, {"name": ["Acme"]}, {"name": "x" * 256},
     {"name": "Acme", "stripe_customer_id": 5}],
    ids=["empty", "blank", "spaces", "null", "number", "list", "too-long", "bad-billing-id"],
)
def test_create_tenant_without_a_usable_name_is_400(admin, clean_db, body):
    """Given the admin token
    When the admin POSTs /tenants without a usable name
    Then it gets 400 {"error", "detail"} and no tenant is created."""
    assert_admin_error(admin.post("/tenants", json=body), 400)
    assert count_rows(clean_db, "tenant") == 0


@pytest.mark.parametrize("content", [b"{", b"[1, 2]", b'"Acme"', b"null"])
def test_create_tenant_with_a_body_that_is_not_an_object_is_400(admin, clean_db, content):
    """Given the admin token
    When the body is not JSON or not an object
    Then 400 {"error", "detail"} and no tenant."""
    response = admin.post("/tenants", content=content, headers={"Content-Type": "application/json"})
    assert_admin_error(response, 400)
    assert count_rows(clean_db, "tenant") == 0


def test_create_tenant_with_billing_ids_appends_an_event(admin, clean_db):
    """Given the admin token
    When the admin creates a tenant with Stripe ids (CONTRACT.md: that can change access)
    Then a sync event is appended; a tenant without billing ids has none."""
    billed = admin.post("/tenants", json={"name": "Billed", "stripe_customer_id": "cus_1", "stripe_subscription_id": "sub_1"})
    plain = admin.post("/tenants", json={"name": "Plain"})
    assert billed.status_code == plain.status_code == 201
    assert sync_counts(admin, billed.json()["tenant_id"])["events_total"] == 1
    assert sync_counts(admin, plain.json()["tenant_id"])["events_total"] == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_connect_scim_for_each_provider(admin, clean_db, live_server, provider):
    """Given a tenant
    When the admin POSTs …/scim with a supported provider
    Then it gets 201 {"tenant_url", "token"}; the token works on the Tenant URL;
    GET …/scim says enabled, with that provider and Tenant URL."""
    tenant_id = admin.post("/tenants", json={"name": "Acme"}).json()["tenant_id"]
    response = admin.post(f"/tenants/{tenant_id}/scim", json={"provider": provider})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"tenant_url", "token"}
    assert body["tenant_url"] == f"{live_server.url}/scim/v2/{tenant_id}"
    assert len(body["token"]) >= 43  # 256 bits, URL-safe base64
    with scim_client(body["tenant_url"], body["token"]) as client:
        assert client.get("/Users").status_code == 200
    scim = admin.get(f"/tenants/{tenant_id}/scim").json()
    assert (scim["enabled"], scim["provider"], scim["tenant_url"]) == (True, provider, body["tenant_url"])


@pytest.mark.parametrize("body", [{}, {"provider": "azure"}, {"provider": "Entra"}, {"provider": None}, {"provider": 1}])
def test_connect_scim_with_unknown_provider_is_400(admin, clean_db, body):
    """Given a tenant
    When the admin connects SCIM without a known provider
    Then it gets 400 {"error", "detail"} and SCIM stays disconnected."""
    tenant_id = admin.post("/tenants", json={"name": "Acme"}).json()["tenant_id"]
    assert_admin_error(admin.post(f"/tenants/{tenant_id}/scim", json=body), 400)
    assert admin.get(f"/tenants/{tenant_id}/scim").json()["enabled"] is False
    with clean_db.connect() as connection:
        assert connection.execute(text("SELECT token_hash FROM tenant")).scalar_one() is None


def test_token_is_stored_only_as_its_sha256(tenant, clean_db):
    """Given a connected tenant
    When the tenant row is read
    Then token_hash is the SHA-256 hex digest of the token, and no column holds the token itself."""
    with clean_db.connect() as connection:
        row = connection.execute(text("SELECT * FROM tenant WHERE id = :t"), {"t": tenant.tenant_id}).mappings().one()
    assert row["token_hash"] == hashlib.sha256(tenant.token.encode()).hexdigest()
    assert all(tenant.token not in str(value) for value in row.values())


def test_last_request_at_is_set_after_a_scim_request(tenant, admin, clean_db):
    """Given a connected tenant that has had no SCIM request
    When the IdP makes one
    Then GET …/scim shows last_request_at (ISO 8601, UTC)."""
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim").json()["last_request_at"] is None
    assert tenant.client.get("/Users").status_code == 200
    seen = admin.get(f"/tenants/{tenant.tenant_id}/scim").json()["last_request_at"]
    assert isinstance(seen, str) and seen.endswith("Z")


def test_last_request_at_is_set_even_when_the_first_request_is_refused(tenant, admin, clean_db):
    """Given a connected tenant that has had no SCIM request
    When the IdP's first request is authenticated but refused (a 404 for an unknown id)
    Then GET …/scim still shows last_request_at: the IdP did reach us."""
    assert_scim_error(tenant.client.get(f"/Users/{uuid.uuid4().hex}"), 404)
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim").json()["last_request_at"] is not None


# ------------------------------------------------------------------ rotation and disconnection


def test_rotate_token(tenant, admin, clean_db):
    """Given a connected tenant
    When the admin rotates the token (POST …/scim/token)
    Then it gets 200 {"tenant_url", "token"} with a new token; the old one answers 401,
    the new one 200; the stored digest is the new token's."""
    response = admin.post(f"/tenants/{tenant.tenant_id}/scim/token")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"tenant_url", "token"}
    assert body["tenant_url"] == tenant.tenant_url
    assert body["token"] != tenant.token
    assert_scim_error(tenant.client.get("/Users"), 401)
    with scim_client(tenant.tenant_url, body["token"]) as client:
        assert client.get("/Users").status_code == 200
    with clean_db.connect() as connection:
        digest = connection.execute(text("SELECT token_hash FROM tenant")).scalar_one()
    assert digest == hashlib.sha256(body["token"].encode()).hexdigest()


def test_disconnect_keeps_the_directory_and_reconnect_restores_it(tenant, admin, clean_db):
    """Given a tenant with a provisioned User in a Group
    When the admin disconnects (DELETE …/scim), tries to rotate, then reconnects (POST …/scim)
    Then disconnect answers 204, GET …/scim says enabled false, SCIM answers 401, the User stays
    in GET …/users and the Group in GET …/groups; rotate is 409; reconnect gives a new token that
    sees the same User and Group, and the pre-disconnect token stays dead."""
    user = create_user(tenant.client, "kept@example.com")
    group = create_group(tenant.client, "Kept", [user["id"]])

    response = admin.delete(f"/tenants/{tenant.tenant_id}/scim")
    assert response.status_code == 204
    assert response.content == b""
    scim = admin.get(f"/tenants/{tenant.tenant_id}/scim").json()
    assert scim["enabled"] is False
    assert_scim_error(tenant.client.get("/Users"), 401)
    users = admin.get(f"/tenants/{tenant.tenant_id}/users").json()
    assert [(u["id"], u["userName"]) for u in users] == [(user["id"], "kept@example.com")]
    assert [(g["id"], g["members"]) for g in admin.get(f"/tenants/{tenant.tenant_id}/groups").json()] == [(group["id"], 1)]

    assert_admin_error(admin.post(f"/tenants/{tenant.tenant_id}/scim/token"), 409)
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim").json()["enabled"] is False

    reconnected = admin.post(f"/tenants/{tenant.tenant_id}/scim", json={"provider": "entra"})
    assert reconnected.status_code == 201, reconnected.text
    token = reconnected.json()["token"]
    assert token != tenant.token
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim").json()["enabled"] is True
    with scim_client(tenant.tenant_url, token) as client:
        assert client.get(f"/Users/{user['id']}").json()["userName"] == "kept@example.com"
        assert {m["value"] for m in client.get(f"/Groups/{group['id']}").json()["members"]} == {user["id"]}
    assert_scim_error(tenant.client.get("/Users"), 401)


def test_remove_user_by_hand(tenant, admin, clean_db):
    """Given a provisioned User (e.g. left over after a disconnect)
    When the admin DELETEs …/users/{id}
    Then 204; the User shows status "deleted", is gone from SCIM, and a sync event was appended;
    an unknown user id is 404."""
    user = create_user(tenant.client, "byhand@example.com")
    before = sync_counts(admin, tenant.tenant_id)["events_total"]
    assert admin.delete(f"/tenants/{tenant.tenant_id}/users/{user['id']}").status_code == 204
    assert [u["status"] for u in admin.get(f"/tenants/{tenant.tenant_id}/users").json()] == ["deleted"]
    assert_scim_error(tenant.client.get(f"/Users/{user['id']}"), 404)
    assert sync_counts(admin, tenant.tenant_id)["events_total"] == before + 1
    assert events(clean_db, tenant.tenant_id)[-1] == ("user_removed", [user["id"]])
    assert_admin_error(admin.delete(f"/tenants/{tenant.tenant_id}/users/{uuid.uuid4().hex}"), 404)


# ------------------------------------------------------------------ groups, users and the mapping


def test_groups_with_member_counts(tenant, admin, clean_db):
    """Given Groups with 2, 1 and 0 members
    When the admin GETs …/groups
    Then every Group is listed with id, displayName, externalId and its member count."""
    a = create_user(tenant.client, "a@example.com")["id"]
    b = create_user(tenant.client, "b@example.com")["id"]
    two = create_group(tenant.client, "Two", [a, b], externalId="ext-two")
    one = create_group(tenant.client, "One", [a])
    none = create_group(tenant.client, "None")
    response = admin.get(f"/tenants/{tenant.tenant_id}/groups")
    assert response.status_code == 200, response.text
    listed = {g["id"]: g for g in response.json()}
    assert listed == {
        two["id"]: {"id": two["id"], "displayName": "Two", "externalId": "ext-two", "members": 2},
        one["id"]: {"id": one["id"], "displayName": "One", "externalId": None, "members": 1},
        none["id"]: {"id": none["id"], "displayName": "None", "externalId": None, "members": 0},
    }


def test_users_list_shape(tenant, admin, clean_db):
    """Given a provisioned User with a primary email
    When the admin GETs …/users before any worker ran
    Then the User is listed with the contract's fields, email = primary email, status no_access."""
    user = create_user(
        tenant.client,
        "shape@example.com",
        displayName="Shape",
        emails=[{"value": "other@example.com"}, {"value": "primary@example.com", "primary": True}],
    )
    [row] = admin.get(f"/tenants/{tenant.tenant_id}/users").json()
    assert set(row) == {
        "id", "userName", "email", "displayName", "active", "role", "license", "status",
        "status_reason", "invited_at", "invite_error", "invite_waiting",
    }
    assert (row["id"], row["userName"], row["email"], row["displayName"], row["active"]) == (
        user["id"], "shape@example.com", "primary@example.com", "Shape", True,
    )
    assert (row["role"], row["license"], row["status"]) == (None, None, "no_access")


def test_users_list_is_read_a_page_at_a_time(tenant, admin, clean_db, monkeypatch):
    """Given 5 Users (one deleted by the IdP) and the list read 2 rows at a time (views.USER_PAGE_ROWS)
    When the admin GETs …/users, and the list of another tenant with no users
    Then every User is listed once, oldest first, exactly as one query of them all gives them
    (what the admin page pages through), across the page boundaries; no page held more than 2 rows;
    the empty tenant's list is []."""
    from sqlmodel import Session

    from api import views

    monkeypatch.setattr(views, "USER_PAGE_ROWS", 2)
    ids = [create_user(tenant.client, f"page{n}@example.com", displayName=f"Page {n}")["id"] for n in range(5)]
    assert tenant.client.delete(f"/Users/{ids[3]}").status_code == 204

    response = admin.get(f"/tenants/{tenant.tenant_id}/users")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    listed = response.json()
    assert [u["id"] for u in listed] == ids
    assert [u["status"] for u in listed] == ["no_access"] * 3 + ["deleted", "no_access"]
    with Session(clean_db) as session:
        assert listed == views.user_rows(session, tenant.tenant_id)
        assert [len(page) for page in views.user_pages(session, tenant.tenant_id)] == [2, 2, 1]
    empty = admin.post("/tenants", json={"name": "Empty"}).json()["tenant_id"]
    assert admin.get(f"/tenants/{empty}/users").json() == []


def test_scim_config_round_trip(tenant, admin, clean_db):
    """Given three Groups
    When the admin PUTs …/scim/config and GETs it back
    Then the answer and the read-back equal what was saved; a sync event for the whole tenant
    was appended; saving again replaces (not merges) the mapping."""
    users = create_group(tenant.client, "Users")["id"]
    admins = create_group(tenant.client, "Admins")["id"]
    team = create_group(tenant.client, "Team licence")["id"]
    config = {
        "user_groups": [users],
        "admin_groups": [admins],
        "license_groups": {"starter": [], "team": [team], "enterprise": []},
        "auto_invite": True,
        "seat_cap": {"team": 10},
        "spend_guard": {"enabled": True, "min_seats": 5, "percent": 50, "first_purchase_seats": 200},
    }
    before = sync_counts(admin, tenant.tenant_id)["events_total"]
    response = admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json=config)
    assert response.status_code == 200, response.text
    assert response.json() == {**config, **DEFAULT_LIMITS}
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json() == {**config, **DEFAULT_LIMITS}
    assert sync_counts(admin, tenant.tenant_id)["events_total"] == before + 1
    assert events(clean_db, tenant.tenant_id)[-1] == ("config_changed", None)

    smaller = {"user_groups": [admins], "admin_groups": [], "license_groups": {}, "auto_invite": False}
    assert admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json=smaller).status_code == 200
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json() == {
        "user_groups": [admins],
        "admin_groups": [],
        "license_groups": {"starter": [], "team": [], "enterprise": []},
        "auto_invite": False,
        "seat_cap": None,
        # Replaced, not merged: a config without a spend guard gets the defaults (on).
        "spend_guard": {"enabled": True, "min_seats": 10, "percent": 25, "first_purchase_seats": 10_000},
        **DEFAULT_LIMITS,
    }


def test_spend_guard_settings_are_checked(tenant, admin, clean_db):
    """A spend guard with an unknown field or a number out of range is a 400 and saves nothing."""
    for bad in ({"percent": -1}, {"min_seats": "10"}, {"enabled": "yes"}, {"limit": 3}, [1],
                {"first_purchase_seats": 10**9}):
        response = admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json={"spend_guard": bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"] == "invalid_body"
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json()["spend_guard"]["percent"] == 25


# The per-tenant limits of a config that sets none: null, the deployment's defaults in effect.
DEFAULT_LIMITS = {
    "invite_daily_cap": None,
    "hold_min_users": None,
    "hold_percent": None,
    "effective": {"invite_daily_cap": 50_000, "hold_min_users": 10, "hold_percent": 20},
}


def test_scim_config_with_an_unknown_group_is_400_and_saves_nothing(tenant, admin, clean_db):
    """Given a saved mapping and a Group of another tenant
    When the admin PUTs a config naming an unknown group id, or the other tenant's group
    Then 400 {"error", "detail"} naming the id, and the saved mapping, the settings and the
    events are unchanged."""
    good = create_group(tenant.client, "Good")["id"]
    saved = {"user_groups": [good], "admin_groups": [], "license_groups": {}, "auto_invite": False}
    assert admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json=saved).status_code == 200
    other = connect_tenant(admin, "Other")
    try:
        foreign = create_group(other.client, "Foreign")["id"]
    finally:
        other.client.close()
    before_config = admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json()
    before_rows = snapshot(clean_db, ("group_mapping", "sync_event"))
    for unknown in ("no-such-group", foreign):
        body = {"user_groups": [good], "admin_groups": [unknown], "auto_invite": True}
        error = assert_admin_error(admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json=body), 400)
        assert unknown in error["detail"]
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json() == before_config
    assert snapshot(clean_db, ("group_mapping", "sync_event")) == before_rows


@pytest.mark.parametrize(
    "body",
    [
        {"user_groups": "g"},
        {"user_groups": [1]},
        {"admin_groups": {"g": 1}},
        {"license_groups": ["g"]},
        {"license_groups": {"gold": []}},
        {"license_groups": {"team": "g"}},
        {"auto_invite": "yes"},
        {"auto_invite": 1},
        {"seat_cap": {"team": -1}},
        {"seat_cap": {"team": "10"}},
        {"seat_cap": {"team": True}},
        {"seat_cap": {"gold": 1}},
        {"seat_cap": [10]},
        {"unknown_field": 1},
    ],
)
def test_scim_config_with_bad_types_is_400(tenant, admin, clean_db, body):
    """Given a tenant
    When the admin PUTs a config with a wrongly typed field
    Then 400 {"error", "detail"} and the config is unchanged."""
    before = admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json()
    assert_admin_error(admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json=body), 400)
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json() == before


def test_sync_counts(tenant, admin, clean_db):
    """Given writes through SCIM and no worker
    When the admin GETs …/sync
    Then it has the contract's fields; events_total counts the writes, events_applied is 0,
    nothing is pending, the tenant was never reconciled and is not quarantined (issue 8's additive fields)."""
    create_user(tenant.client, "s1@example.com")
    create_user(tenant.client, "s2@example.com")
    assert sync_counts(admin, tenant.tenant_id) == {
        "events_total": 2,
        "events_applied": 0,
        "pending_purchases": 0,
        "pending_invitations": 0,
        "waiting_invitations": 0,
        "held_users": 0,
        "last_reconciled_at": None,
        "reconcile_failures": 0,
        "quarantined_until": None,
        "last_error": None,
    }


# ------------------------------------------------------------------ auth and unknown tenants

TENANT_CALLS = [
    ("GET", "/tenants/{t}/scim", None),
    ("POST", "/tenants/{t}/scim", {"provider": "entra"}),
    ("DELETE", "/tenants/{t}/scim", None),
    ("POST", "/tenants/{t}/scim/token", None),
    ("GET", "/tenants/{t}/scim/config", None),
    ("PUT", "/tenants/{t}/scim/config", {"user_groups": []}),
    ("GET", "/tenants/{t}/groups", None),
    ("GET", "/tenants/{t}/users", None),
    ("DELETE", "/tenants/{t}/users/x", None),
    ("GET", "/tenants/{t}/licenses", None),
    ("GET", "/tenants/{t}/purchases", None),
    ("GET", "/tenants/{t}/sync", None),
]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}, {"Authorization": ADMIN_TOKEN}],
    ids=["none", "wrong", "basic", "no-scheme"],
)
def test_admin_token_missing_or_wrong_is_401(tenant, live_server, clean_db, headers):
    """Given a tenant
    When any admin call is made without the admin bearer token (or with the tenant's SCIM token)
    Then 401 {"error", "detail"} and nothing changed (the SCIM token still works)."""
    before = snapshot(clean_db, ("tenant", "group_mapping", "sync_event"))
    with plain_client(f"{live_server.url}/admin/api", headers) as client:
        assert_admin_error(client.post("/tenants", json={"name": "Nope"}), 401)
        for method, path, body in TENANT_CALLS:
            assert_admin_error(client.request(method, path.format(t=tenant.tenant_id), json=body), 401)
    with plain_client(f"{live_server.url}/admin/api", {"Authorization": f"Bearer {tenant.token}"}) as client:
        assert_admin_error(client.get(f"/tenants/{tenant.tenant_id}/scim"), 401)
    assert snapshot(clean_db, ("tenant", "group_mapping", "sync_event")) == before
    assert tenant.client.get("/Users").status_code == 200


@pytest.mark.parametrize("method, path, body", TENANT_CALLS, ids=[f"{m} {p}" for m, p, _ in TENANT_CALLS])
def test_unknown_tenant_is_404(admin, clean_db, method, path, body):
    """Given the admin token
    When an admin call names a tenant that does not exist
    Then 404 {"error", "detail"}."""
    assert_admin_error(admin.request(method, path.format(t=uuid.uuid4().hex), json=body), 404)


@pytest.mark.parametrize("tenant_id", ["a%00b", "x" * 3000])
def test_odd_tenant_ids_are_404(admin, clean_db, tenant_id):
    """Given the admin token
    When the tenant id in the path holds U+0000 or is absurdly long
    Then 404 {"error", "detail"}, not a database error."""
    assert_admin_error(admin.get(f"/tenants/{tenant_id}/scim"), 404)


def test_tenant_name_with_nul_is_400(admin, clean_db):
    """Given the admin token
    When a tenant name holds U+0000 (PostgreSQL text cannot store it)
    Then 400 {"error", "detail"} and no tenant."""
    assert_admin_error(admin.post("/tenants", json={"name": "Ac\u0000me"}), 400)
    assert count_rows(clean_db, "tenant") == 0
