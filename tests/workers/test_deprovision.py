"""The mass-deprovision circuit breaker and group tombstones, driven through SCIM, the admin API and reconcile."""

from __future__ import annotations

import pytest
from sqlalchemy import event, select

from models.tables import Alert
from tests.workers.support import make_user, settle_pipeline, users_by_name
from workers.deprovision import HoldPolicy

PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def reconcile(engine, tenant_id: str) -> None:
    """Apply every event of the tenant and settle its (ledger-only) purchases, as a calm worker would."""
    settle_pipeline(engine, tenant_id)


def statuses(admin, tenant_id: str) -> dict[str, str]:
    return {name: row["status"] for name, row in users_by_name(admin, tenant_id).items()}


def setup_tenant(admin, tenant, engine, count: int, **limits) -> tuple[list[str], str]:
    """``count`` users in one mapped user group (external id "ext-users"), all with access."""
    ids = [make_user(tenant.client, f"u{i:03}@acme.example") for i in range(count)]
    response = tenant.client.post("/Groups", json={
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "All staff",
        "externalId": "ext-users", "members": [{"value": user_id} for user_id in ids],
    })
    assert response.status_code == 201, response.text
    group = response.json()["id"]
    saved = admin.put(f"/tenants/{tenant.tenant_id}/scim/config",
                      json={"user_groups": [group], "license_groups": {"team": [group]}, **limits})
    assert saved.status_code == 200, saved.text
    reconcile(engine, tenant.tenant_id)
    assert set(statuses(admin, tenant.tenant_id).values()) == {"active"}
    return ids, group


@pytest.mark.parametrize(
    ("removals", "active", "held"),
    [(10, 10, False), (11, 11, True), (11, 100, False), (20, 100, False), (21, 100, True), (0, 0, False)],
)
def test_the_threshold_is_more_than_max_of_min_users_and_percent(removals, active, held):
    """Given the default policy (10 users, 20 %), Then removals are held only past both."""
    assert HoldPolicy(min_users=10, percent=20).trips(removals, active) is held


def test_deleting_the_mapped_group_holds_every_removal_until_the_admin_confirms(admin, tenant, engine):
    """Given 12 users with access through one mapped group, When the IdP deletes the group,
    Then nobody loses access: all 12 are `held` with the reason, keep role and license, an alert is open
    and GET …/holds lists them; When the admin confirms, Then the next reconcile removes their access."""
    ids, group = setup_tenant(admin, tenant, engine, 12)

    assert tenant.client.delete(f"/Groups/{group}").status_code == 204
    reconcile(engine, tenant.tenant_id)

    rows = users_by_name(admin, tenant.tenant_id)
    assert {row["status"] for row in rows.values()} == {"held"}
    assert {(row["role"], row["license"]) for row in rows.values()} == {("user", "team")}
    assert all("12 of 12 active users" in row["status_reason"] for row in rows.values())
    holds = admin.get(f"/tenants/{tenant.tenant_id}/holds").json()
    assert sorted(h["id"] for h in holds["held"]) == sorted(ids)
    assert [a["kind"] for a in holds["alerts"]] == ["mass_deprovision"]
    assert admin.get(f"/tenants/{tenant.tenant_id}/licenses").json()["team"]["assigned"] == 12
    assert admin.get(f"/tenants/{tenant.tenant_id}/sync").json()["held_users"] == 12

    confirmed = admin.post(f"/tenants/{tenant.tenant_id}/holds/confirm")
    assert confirmed.status_code == 200 and confirmed.json() == {"confirmed": 12}
    reconcile(engine, tenant.tenant_id)

    assert set(statuses(admin, tenant.tenant_id).values()) == {"no_access"}
    assert admin.get(f"/tenants/{tenant.tenant_id}/holds").json() == {"held": [], "alerts": []}
    assert admin.get(f"/tenants/{tenant.tenant_id}/licenses").json()["team"]["assigned"] == 0
    with engine.connect() as connection:
        assert connection.execute(select(Alert.resolution)).scalars().all() == ["confirmed"]


def test_revert_keeps_access_and_recreating_the_group_restores_its_mapping(admin, tenant, engine):
    """Given a held mass removal after the IdP deleted the mapped group, When the admin reverts,
    Then everyone is active again with role and license, and nothing is held; When the IdP creates the group
    again with the same externalId, Then the mapping points at the new group (the tombstone is restored)
    and a later removal of one member applies at once (below the threshold)."""
    ids, group = setup_tenant(admin, tenant, engine, 12)
    config_before = admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json()
    assert tenant.client.delete(f"/Groups/{group}").status_code == 204
    reconcile(engine, tenant.tenant_id)
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json()["user_groups"] == []

    reverted = admin.post(f"/tenants/{tenant.tenant_id}/holds/revert")
    assert reverted.status_code == 200 and reverted.json() == {"reverted": 12}
    assert set(statuses(admin, tenant.tenant_id).values()) == {"active"}
    reconcile(engine, tenant.tenant_id)
    assert set(statuses(admin, tenant.tenant_id).values()) == {"active"}

    again = tenant.client.post("/Groups", json={
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "All staff",
        "externalId": "ext-users", "members": [{"value": user_id} for user_id in ids],
    })
    assert again.status_code == 201, again.text
    new_group = again.json()["id"]
    reconcile(engine, tenant.tenant_id)

    config = admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json()
    assert config["user_groups"] == [new_group] and config["license_groups"]["team"] == [new_group]
    assert {k: v for k, v in config.items() if k not in ("user_groups", "license_groups")} == {
        k: v for k, v in config_before.items() if k not in ("user_groups", "license_groups")}
    rows = users_by_name(admin, tenant.tenant_id)
    assert {(row["status"], row["role"], row["license"]) for row in rows.values()} == {("active", "user", "team")}

    removed = tenant.client.patch(f"/Groups/{new_group}", json={
        "schemas": [PATCH], "Operations": [{"op": "remove", "path": f'members[value eq "{ids[0]}"]'}]})
    assert removed.status_code in (200, 204), removed.text
    reconcile(engine, tenant.tenant_id)
    assert statuses(admin, tenant.tenant_id)["u000@acme.example"] == "no_access"


def test_small_removals_apply_at_once_and_trickled_deletions_trip_the_breaker(admin, tenant, engine):
    """Given 30 users with access, When the IdP deletes 3 (below max(10, 20 %)), Then they lose access at once;
    When it goes on deleting users one request and one reconcile at a time, Then the removals within the hour
    add up: once they pass the threshold the rest are held."""
    ids, group = setup_tenant(admin, tenant, engine, 30)

    for user_id in ids[:3]:
        assert tenant.client.delete(f"/Users/{user_id}").status_code == 204
    reconcile(engine, tenant.tenant_id)
    assert [statuses(admin, tenant.tenant_id).get(f"u{i:03}@acme.example") for i in range(3)] == ["deleted"] * 3

    for user_id in ids[3:15]:
        assert tenant.client.delete(f"/Users/{user_id}").status_code == 204
        reconcile(engine, tenant.tenant_id)

    seen = statuses(admin, tenant.tenant_id)
    # 30 active: 10 removals are allowed (max(10, 6)); the 11th and later are held.
    assert [seen[f"u{i:03}@acme.example"] for i in range(15)] == ["deleted"] * 10 + ["held"] * 5
    assert len(admin.get(f"/tenants/{tenant.tenant_id}/holds").json()["held"]) == 5


def test_a_removal_that_cannot_trip_the_breaker_does_not_count_the_tenants_users(admin, tenant, engine):
    """Given 12 users with access (max(10, 20 %) = 10 removals allowed)
    When the IdP deletes one user and the tenant is reconciled
    Then the user loses access at once, and the reconcile counted the recent removals but not the
    tenant's active users (a scan of every account: 7 ms in a 100,000-user tenant, for nothing);
    When nine more are deleted at once (10 removals: still allowed), the same; an eleventh trips it (counted)."""
    ids, _ = setup_tenant(admin, tenant, engine, 12)
    counts: list[str] = []

    def seen(_conn, _cursor, statement, *_args) -> None:
        if "count(" in statement.lower() and "FROM account" in statement:
            counts.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert tenant.client.delete(f"/Users/{ids[0]}").status_code == 204
        reconcile(engine, tenant.tenant_id)
        assert statuses(admin, tenant.tenant_id)["u000@acme.example"] == "deleted"
        assert counts and all("access_removed_at" in c and "role IS NOT NULL" not in c for c in counts), counts
        for user_id in ids[1:10]:
            assert tenant.client.delete(f"/Users/{user_id}").status_code == 204
        counts.clear()
        reconcile(engine, tenant.tenant_id)
        assert all("role IS NOT NULL" not in c for c in counts), counts
        assert tenant.client.delete(f"/Users/{ids[10]}").status_code == 204
        counts.clear()
        reconcile(engine, tenant.tenant_id)
        assert any("role IS NOT NULL" in c for c in counts), counts
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    seen_now = statuses(admin, tenant.tenant_id)
    assert [seen_now[f"u{i:03}@acme.example"] for i in range(11)] == ["deleted"] * 10 + ["held"]


def test_the_tenant_thresholds_come_from_its_config(admin, tenant, engine):
    """Given a tenant whose config sets hold_min_users=2 and hold_percent=50, When 3 of 4 users lose access,
    Then they are held; with the defaults (10 users) the same removal would apply."""
    ids, group = setup_tenant(admin, tenant, engine, 4, hold_min_users=2, hold_percent=50)

    removed = tenant.client.patch(f"/Groups/{group}", json={
        "schemas": [PATCH],
        "Operations": [{"op": "remove", "path": f'members[value eq "{user_id}"]'} for user_id in ids[:3]]})
    assert removed.status_code in (200, 204), removed.text
    reconcile(engine, tenant.tenant_id)

    assert sorted(statuses(admin, tenant.tenant_id).values()) == ["active", "held", "held", "held"]


def test_holds_endpoints_need_the_admin_token_and_a_known_tenant(admin, live_server):
    """Given no admin token or an unknown tenant, Then 401 and 404 with an admin error body."""
    import httpx

    with httpx.Client(base_url=f"{live_server.url}/admin/api") as anonymous:
        assert anonymous.get("/tenants/x/holds").status_code == 401
    for call in (admin.get("/tenants/nope/holds"), admin.post("/tenants/nope/holds/confirm"),
                 admin.post("/tenants/nope/holds/revert")):
        assert call.status_code == 404 and set(call.json()) == {"error", "detail"}


def test_a_held_user_who_regains_access_is_active_and_confirmed_removals_do_not_trip_again(admin, tenant, engine):
    """Given 12 users held after their group lost them all, When the IdP puts 2 back, Then those 2 are active
    again (no longer held); When the admin confirms the other 10 and, later within the hour, one more user
    is removed, Then that one removal applies at once: confirmed removals do not count towards a new hold."""
    ids, group = setup_tenant(admin, tenant, engine, 14)
    removed = tenant.client.patch(f"/Groups/{group}", json={
        "schemas": [PATCH],
        "Operations": [{"op": "remove", "path": f'members[value eq "{user_id}"]'} for user_id in ids[:12]]})
    assert removed.status_code in (200, 204), removed.text
    reconcile(engine, tenant.tenant_id)
    assert sorted(statuses(admin, tenant.tenant_id).values()) == ["active"] * 2 + ["held"] * 12

    back = tenant.client.patch(f"/Groups/{group}", json={
        "schemas": [PATCH], "Operations": [{"op": "add", "path": "members", "value": [{"value": ids[0]}, {"value": ids[1]}]}]})
    assert back.status_code in (200, 204), back.text
    reconcile(engine, tenant.tenant_id)
    seen = statuses(admin, tenant.tenant_id)
    assert (seen["u000@acme.example"], seen["u001@acme.example"]) == ("active", "active")
    assert len(admin.get(f"/tenants/{tenant.tenant_id}/holds").json()["held"]) == 10

    assert admin.post(f"/tenants/{tenant.tenant_id}/holds/confirm").json() == {"confirmed": 10}
    reconcile(engine, tenant.tenant_id)
    one_more = tenant.client.patch(f"/Groups/{group}", json={
        "schemas": [PATCH], "Operations": [{"op": "remove", "path": f'members[value eq "{ids[12]}"]'}]})
    assert one_more.status_code in (200, 204), one_more.text
    reconcile(engine, tenant.tenant_id)

    seen = statuses(admin, tenant.tenant_id)
    assert seen["u012@acme.example"] == "no_access"
    assert sorted(seen.values()) == ["active"] * 3 + ["no_access"] * 11
    assert admin.get(f"/tenants/{tenant.tenant_id}/holds").json() == {"held": [], "alerts": []}


def test_after_a_revert_the_next_idp_change_about_a_user_counts_again(admin, tenant, engine):
    """Given a reverted hold (users kept their access though the directory says otherwise),
    When the admin saves the mapping again (a whole-tenant re-evaluation), Then they keep it;
    When the IdP then deactivates one of them, Then that user loses access (a single removal applies)."""
    ids, group = setup_tenant(admin, tenant, engine, 12)
    removed = tenant.client.patch(f"/Groups/{group}", json={
        "schemas": [PATCH],
        "Operations": [{"op": "remove", "path": f'members[value eq "{user_id}"]'} for user_id in ids]})
    assert removed.status_code in (200, 204), removed.text
    reconcile(engine, tenant.tenant_id)
    assert admin.post(f"/tenants/{tenant.tenant_id}/holds/revert").json() == {"reverted": 12}

    config = admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json()
    saved = admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json={
        k: v for k, v in config.items() if k != "effective"})
    assert saved.status_code == 200, saved.text
    reconcile(engine, tenant.tenant_id)
    assert set(statuses(admin, tenant.tenant_id).values()) == {"active"}

    deactivated = tenant.client.patch(f"/Users/{ids[5]}", json={
        "schemas": [PATCH], "Operations": [{"op": "replace", "path": "active", "value": False}]})
    assert deactivated.status_code in (200, 204), deactivated.text
    reconcile(engine, tenant.tenant_id)

    seen = statuses(admin, tenant.tenant_id)
    assert seen["u005@acme.example"] == "no_access"
    assert sorted(seen.values()) == ["active"] * 11 + ["no_access"]


def test_users_the_admin_removes_by_hand_are_never_held(admin, tenant, engine):
    """Given 12 users with access, When the admin removes all 12 by hand (DELETE …/users/{id}, after a
    disconnect), Then their access goes at once: the admin's own removals are neither held nor counted."""
    ids, _group = setup_tenant(admin, tenant, engine, 12)

    for user_id in ids:
        assert admin.delete(f"/tenants/{tenant.tenant_id}/users/{user_id}").status_code == 204
    reconcile(engine, tenant.tenant_id)

    assert set(statuses(admin, tenant.tenant_id).values()) == {"deleted"}
    assert admin.get(f"/tenants/{tenant.tenant_id}/holds").json() == {"held": [], "alerts": []}
