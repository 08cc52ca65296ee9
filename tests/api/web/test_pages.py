"""The admin page's forms and views without a browser (Starlette TestClient on the real app and database).

What the admin sees and what each form changes; the browser walk is in test_browser.py.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import text

from models.db import session_scope
from models.tables import Purchase, utcnow
from tests.api.helpers import count_rows
from tests.api.web.conftest import make_client, sign_in
from tests.conftest import ADMIN_TOKEN


def new_tenant(client, csrf: str, name: str = "Acme", provider: str | None = "entra") -> tuple[str, str | None]:
    """Create a tenant through the page (and connect SCIM); returns its id and the token shown once."""
    created = client.post("/tenants", data={"name": name, "csrf": csrf})
    assert created.status_code == 303, created.text
    tenant_id = created.headers["location"].split("/")[2]
    if provider is None:
        return tenant_id, None
    shown = client.post(f"/tenants/{tenant_id}/scim/connect", data={"provider": provider, "csrf": csrf})
    assert shown.status_code == 201, shown.text
    token = re.search(r'id="secret-token" readonly value="([^"]+)"', shown.text).group(1)
    return tenant_id, token


def scim_post_user(client, tenant_id: str, token: str, user_name: str, **extra) -> str:
    response = client.post(
        f"/scim/v2/{tenant_id}/Users",
        json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": user_name, **extra},
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_the_token_is_shown_once_and_rotating_replaces_it(signed_in):
    """The Token appears on the set-up answer only; a later GET shows the Tenant URL but no token;
    rotating shows a new one and the old one gets 401 from SCIM."""
    client, csrf = signed_in
    tenant_id, token = new_tenant(client, csrf)
    page = client.get(f"/tenants/{tenant_id}/scim")
    assert token not in page.text and f"/scim/v2/{tenant_id}" in page.text
    assert "Connected to Microsoft Entra (Azure AD)" in page.text
    rotated = client.post(f"/tenants/{tenant_id}/scim/rotate", data={"csrf": csrf})
    assert rotated.status_code == 200 and "The old token no longer works" in rotated.text
    new = re.search(r'id="secret-token" readonly value="([^"]+)"', rotated.text).group(1)
    assert new != token
    old = client.get(f"/scim/v2/{tenant_id}/Users", headers={"Authorization": f"Bearer {token}"})
    assert old.status_code == 401
    assert client.get(f"/scim/v2/{tenant_id}/Users", headers={"Authorization": f"Bearer {new}"}).status_code == 200


def test_connecting_twice_or_an_unknown_idp_is_a_clear_error(signed_in):
    client, csrf = signed_in
    tenant_id, _ = new_tenant(client, csrf)
    again = client.post(f"/tenants/{tenant_id}/scim/connect", data={"provider": "okta", "csrf": csrf})
    assert again.status_code == 409 and "already connected" in again.text
    other, _ = new_tenant(client, csrf, "Other", provider=None)
    bad = client.post(f"/tenants/{other}/scim/connect", data={"provider": "myspace", "csrf": csrf})
    assert bad.status_code == 400 and "must be one of" in bad.text


def test_not_syncing_for_n_hours_is_shown_when_the_idp_is_silent(signed_in, clean_db):
    """Given SCIM connected and the IdP's last request 5 hours ago (SCIM_STALE_HOURS is 2),
    Then the SCIM page warns "Not syncing for 5 hours"; after a fresh request the warning is gone."""
    client, csrf = signed_in
    tenant_id, token = new_tenant(client, csrf)
    assert "None yet" in client.get(f"/tenants/{tenant_id}/scim").text
    with clean_db.begin() as connection:
        connection.execute(
            text("UPDATE tenant SET last_request_at = :t WHERE id = :id"),
            {"t": utcnow() - timedelta(hours=5, minutes=10), "id": tenant_id},
        )
    assert "Not syncing for 5 hours." in client.get(f"/tenants/{tenant_id}/scim").text
    scim_post_user(client, tenant_id, token, "ada@example.com")
    assert "Not syncing" not in client.get(f"/tenants/{tenant_id}/scim").text


def test_users_are_paged_and_searchable(base_settings, clean_db):
    """With WEB_PAGE_SIZE 2 and 5 users: page 1 has 2 and a Next link, page 3 has 1;
    a search narrows by userName or displayName, case-insensitively."""
    with make_client(replace(base_settings, web_page_size=2), clean_db) as client:
        csrf = sign_in(client)
        tenant_id, token = new_tenant(client, csrf)
        for i in range(5):
            scim_post_user(client, tenant_id, token, f"user{i}@example.com", displayName=f"Person {i}")
        first = client.get(f"/tenants/{tenant_id}/users")
        assert "5 user(s)" in first.text and "page 1 of 3" in first.text
        assert re.findall(r">(user\d@example.com)</a>", first.text) == ["user0@example.com", "user1@example.com"]
        assert 'rel="next"' in first.text and 'rel="prev"' not in first.text
        last = client.get(f"/tenants/{tenant_id}/users", params={"page": 3})
        assert re.findall(r">(user\d@example.com)</a>", last.text) == ["user4@example.com"]
        found = client.get(f"/tenants/{tenant_id}/users", params={"q": "PERSON 3"})
        assert re.findall(r">(user\d@example.com)</a>", found.text) == ["user3@example.com"]
        assert "1 user(s) matching" in found.text
        none = client.get(f"/tenants/{tenant_id}/users", params={"q": "100%_"})
        assert "No user matches." in none.text
        assert client.get(f"/tenants/{tenant_id}/users", params={"page": "99999999999999999999"}).status_code == 200


def test_a_bad_seat_cap_or_unknown_group_changes_nothing(signed_in, clean_db):
    client, csrf = signed_in
    tenant_id, _ = new_tenant(client, csrf)
    before = count_rows(clean_db, "group_mapping") + count_rows(clean_db, "sync_event")
    bad_cap = client.post(f"/tenants/{tenant_id}/mapping", data={"csrf": csrf, "action": "save", "cap:team": "ten"})
    assert bad_cap.status_code == 400 and "seat cap must be a whole number" in bad_cap.text
    unknown = client.post(f"/tenants/{tenant_id}/mapping", data={"csrf": csrf, "action": "save", "user": "nope"})
    assert unknown.status_code == 400 and "Unknown group id" in unknown.text
    assert count_rows(clean_db, "group_mapping") + count_rows(clean_db, "sync_event") == before
    assert count_rows(clean_db, "audit_log", "action = 'mapping_saved'") == 0


def test_remove_a_user_after_a_confirmation(signed_in, clean_db):
    client, csrf = signed_in
    tenant_id, token = new_tenant(client, csrf)
    user_id = scim_post_user(client, tenant_id, token, "ada@example.com")
    confirm = client.get(f"/tenants/{tenant_id}/users/{user_id}/remove")
    assert confirm.status_code == 200 and "Remove ada@example.com?" in confirm.text
    assert count_rows(clean_db, "scim_user", "deleted_at IS NOT NULL") == 0  # a GET removes nothing
    removed = client.post(f"/tenants/{tenant_id}/users/{user_id}/remove", data={"csrf": csrf})
    assert removed.status_code == 303 and removed.headers["location"].endswith("/users?done=removed")
    assert count_rows(clean_db, "scim_user", "deleted_at IS NOT NULL") == 1
    audit = client.get(f"/tenants/{tenant_id}/audit").text
    assert "User removed" in audit and "admin session" in audit and "userName: ada@example.com" in audit
    assert client.post(f"/tenants/{tenant_id}/users/nope/remove", data={"csrf": csrf}).status_code == 404


def test_link_billing_from_the_page(signed_in, clean_db):
    client, csrf = signed_in
    tenant_id, _ = new_tenant(client, csrf, provider=None)
    assert "Ledger only" in client.get(f"/tenants/{tenant_id}/billing").text
    half = client.post(f"/tenants/{tenant_id}/billing", data={"csrf": csrf, "stripe_customer_id": "cus_1"})
    assert half.status_code == 400
    linked = client.post(
        f"/tenants/{tenant_id}/billing",
        data={"csrf": csrf, "stripe_customer_id": "cus_1", "stripe_subscription_id": "sub_1"},
    )
    assert linked.status_code == 303
    page = client.get(linked.headers["location"]).text
    assert "Billing linked" in page and "sub_1" in page
    # Not checked yet: the page says so until a worker has verified the link against Stripe.
    assert "unverified" in page and "a worker checks the subscription against Stripe" in page
    assert count_rows(clean_db, "tenant", "stripe_subscription_id = 'sub_1'") == 1


def test_the_preview_form_buys_nothing_and_save_applies(signed_in, clean_db):
    """Preview renders seats to buy ("ledger only" here) and writes nothing; Save writes the mapping,
    one sync event, one audit row, and sends the admin to the Sync page."""
    client, csrf = signed_in
    tenant_id, token = new_tenant(client, csrf)
    ada = scim_post_user(client, tenant_id, token, "ada@example.com")
    group = client.post(
        f"/scim/v2/{tenant_id}/Groups",
        json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Staff",
              "members": [{"value": ada}]},
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"},
    ).json()["id"]
    mapping = client.get(f"/tenants/{tenant_id}/mapping").text
    assert "Staff" in mapping and "Preview changes" in mapping and 'value="save"' not in mapping
    events = count_rows(clean_db, "sync_event")
    form = {"csrf": csrf, "user": group, f"tier:{group}": "team", "auto_invite": "on"}
    preview = client.post(f"/tenants/{tenant_id}/mapping", data={**form, "action": "preview"})
    assert preview.status_code == 200
    assert "ada@example.com: no access → user (team)" in preview.text
    assert "Ledger only:" in preview.text and "1 seat(s) will be recorded as not billed" in preview.text
    assert count_rows(clean_db, "sync_event") == events and count_rows(clean_db, "group_mapping") == 0
    saved = client.post(f"/tenants/{tenant_id}/mapping", data={**form, "action": "save"})
    assert saved.status_code == 303 and saved.headers["location"] == f"/tenants/{tenant_id}/sync?done=saved"
    assert count_rows(clean_db, "group_mapping") == 2 and count_rows(clean_db, "sync_event") == events + 1
    sync = client.get(saved.headers["location"]).text
    assert 'data-refresh="2000"' in sync and "Working" in sync  # not applied yet: no worker here
    assert ADMIN_TOKEN not in sync


def _hold(engine, tenant_id: str, purchase_id: str) -> None:
    """A purchase the spend guard holds (as the purchase job leaves it), written directly."""
    with session_scope(engine) as session:
        session.add(Purchase(id=purchase_id, tenant_id=tenant_id, status="awaiting_approval", trigger="scim_sync",
                             quantities_before={"starter": 5}, demand={"starter": 30},
                             hold_reason="starter 5 → 30 adds 25 seats"))


def test_a_held_purchase_is_approved_or_rejected_from_the_billing_page(signed_in, clean_db):
    """Given a purchase the spend guard holds, When the admin rejects it on the billing page (and approves
    the next one), Then the same service as the admin API decides them (cancelled / pending), each
    decision is audited, and a second decision on the same purchase is a 409 page."""
    client, csrf = signed_in
    tenant_id, _ = new_tenant(client, csrf, provider=None)
    _hold(clean_db, tenant_id, "held1")
    page = client.get(f"/tenants/{tenant_id}/billing").text
    assert f'action="/tenants/{tenant_id}/purchases/held1/approve"' in page
    assert f'action="/tenants/{tenant_id}/purchases/held1/reject"' in page
    assert "starter 5 → 30 adds 25 seats" in page
    assert client.post(f"/tenants/{tenant_id}/purchases/held1/approve", data={}).status_code == 400, "no CSRF token"

    rejected = client.post(f"/tenants/{tenant_id}/purchases/held1/reject", data={"csrf": csrf})
    assert rejected.status_code == 303 and rejected.headers["location"].endswith("?done=rejected")
    _hold(clean_db, tenant_id, "held2")
    approved = client.post(f"/tenants/{tenant_id}/purchases/held2/approve", data={"csrf": csrf})
    assert approved.status_code == 303 and approved.headers["location"].endswith("?done=approved")
    with clean_db.connect() as connection:
        statuses = dict(connection.execute(text("SELECT id, status FROM purchase WHERE tenant_id = :t"),
                                           {"t": tenant_id}).all())
    assert statuses == {"held1": "cancelled", "held2": "pending"}
    assert client.post(f"/tenants/{tenant_id}/purchases/held2/approve", data={"csrf": csrf}).status_code == 409
    assert client.post(f"/tenants/{tenant_id}/purchases/held2/destroy", data={"csrf": csrf}).status_code == 404
    assert client.post(f"/tenants/{tenant_id}/purchases/nope/approve", data={"csrf": csrf}).status_code == 404
    assert count_rows(clean_db, "audit_log", "tenant_id = :t AND action = 'purchase_rejected'", t=tenant_id) == 1
    assert count_rows(clean_db, "audit_log", "tenant_id = :t AND action = 'purchase_approved'", t=tenant_id) == 1


def test_saving_the_mapping_page_keeps_the_tenants_other_settings(signed_in, clean_db):
    """The page edits the mapping only: limits set through the admin API (daily invitation cap,
    mass-deprovision thresholds) survive a Save of the page unchanged."""
    client, csrf = signed_in
    tenant_id, _token = new_tenant(client, csrf)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    limits = {"invite_daily_cap": 7, "hold_min_users": 3, "hold_percent": 50}
    put = client.put(f"/admin/api/tenants/{tenant_id}/scim/config", json=limits, headers=admin)
    assert put.status_code == 200, put.text
    saved = client.post(f"/tenants/{tenant_id}/mapping", data={"csrf": csrf, "auto_invite": "on", "action": "save"})
    assert saved.status_code == 303, saved.text
    config = client.get(f"/admin/api/tenants/{tenant_id}/scim/config", headers=admin).json()
    assert {key: config[key] for key in limits} == limits
    assert config["auto_invite"] is True
