"""SCIM Groups under the Tenant URL: create, read, replace, patch members, delete, list and filter (RFC 7644 §3)."""

from __future__ import annotations

import pytest

from tests.api.helpers import (
    GROUP_SCHEMA,
    assert_scim_error,
    count_rows,
    create_group,
    create_user,
    create_users,
    events,
    group_body,
    member_ids,
    patch_body,
    snapshot,
    sync_counts,
)


def test_create_group_with_members_and_read_it(tenant, clean_db):
    """Given two Users
    When the IdP POSTs a Group holding both (RFC 7644 §3.3, RFC 7643 §4.2)
    Then it gets 201 with the members, a GET shows the same members with type and $ref,
    one group_member row exists per member, and each User lists the group."""
    alice = create_user(tenant.client, "alice@example.com")
    bob = create_user(tenant.client, "bob@example.com")
    response = tenant.client.post("/Groups", json=group_body("Engineering", [alice["id"], bob["id"]], externalId="g-ext"))
    assert response.status_code == 201, response.text
    group = response.json()
    assert group["schemas"] == [GROUP_SCHEMA]
    assert group["displayName"] == "Engineering"
    assert group["externalId"] == "g-ext"
    assert group["meta"]["resourceType"] == "Group"
    assert response.headers["location"] == f"{tenant.tenant_url}/Groups/{group['id']}"

    fetched = tenant.client.get(f"/Groups/{group['id']}").json()
    assert {(m["value"], m["type"], m["$ref"]) for m in fetched["members"]} == {
        (alice["id"], "User", f"{tenant.tenant_url}/Users/{alice['id']}"),
        (bob["id"], "User", f"{tenant.tenant_url}/Users/{bob['id']}"),
    }
    assert count_rows(clean_db, "group_member", "group_id = :g", g=group["id"]) == 2
    alice_groups = tenant.client.get(f"/Users/{alice['id']}").json()["groups"]
    assert [(g["value"], g["display"]) for g in alice_groups] == [(group["id"], "Engineering")]


def test_group_display_name_is_not_unique(tenant, clean_db):
    """Given a Group "Sales"
    When the IdP creates another Group "sales" (RFC 7643 §4.2: displayName has no uniqueness)
    Then both exist (201) and a displayName filter finds both."""
    first = create_group(tenant.client, "Sales")
    second = create_group(tenant.client, "sales")
    assert first["id"] != second["id"]
    found = tenant.client.get("/Groups", params={"filter": 'displayName eq "SALES"'}).json()
    assert sorted(r["id"] for r in found["Resources"]) == sorted([first["id"], second["id"]])


def test_nested_group_member(tenant, clean_db):
    """Given a Group
    When it is added as a member of another Group (RFC 7643 §4.2: members may be Groups)
    Then the member shows with type "Group", and a group cannot contain itself (400)."""
    inner = create_group(tenant.client, "Inner")
    outer = create_group(tenant.client, "Outer", [inner["id"]])
    members = tenant.client.get(f"/Groups/{outer['id']}").json()["members"]
    assert [(m["value"], m["type"]) for m in members] == [(inner["id"], "Group")]
    response = tenant.client.patch(
        f"/Groups/{outer['id']}", json=patch_body({"op": "add", "path": "members", "value": [{"value": outer["id"]}]})
    )
    assert_scim_error(response, 400, "invalidValue")


def test_put_group_replaces_name_and_members(tenant, admin, clean_db):
    """Given a Group with members A and B
    When the IdP PUTs it with members B and C and a new name (RFC 7644 §3.5.1)
    Then the answer and a GET show exactly B and C and the new name,
    and one sync event names the users whose membership changed (A and C)."""
    a, b, c = create_users(tenant.client, 3)
    group = create_group(tenant.client, "Old name", [a, b])
    response = tenant.client.put(f"/Groups/{group['id']}", json=group_body("New name", [b, c]))
    assert response.status_code == 200, response.text
    assert response.json()["displayName"] == "New name"
    assert {m["value"] for m in response.json()["members"]} == {b, c}
    assert member_ids(tenant.client, group["id"]) == {b, c}
    assert events(clean_db, tenant.tenant_id)[-1] == ("group_updated", sorted([a, c]))


def test_patch_group_rename_add_and_remove_members(tenant, clean_db):
    """Given a Group with member A
    When the IdP PATCHes: replace displayName, add B and C, remove A by filter (RFC 7644 §3.5.2)
    Then the answer is 200 or 204 (RFC 7644 §3.5.2) and a GET shows the new name and B and C."""
    a, b, c = create_users(tenant.client, 3)
    group = create_group(tenant.client, "Team", [a])
    response = tenant.client.patch(
        f"/Groups/{group['id']}",
        json=patch_body(
            {"op": "replace", "path": "displayName", "value": "Renamed"},
            {"op": "add", "path": "members", "value": [{"value": b}, {"value": c}]},
            {"op": "remove", "path": f'members[value eq "{a}"]'},
        ),
    )
    assert response.status_code in (200, 204), response.text
    fetched = tenant.client.get(f"/Groups/{group['id']}").json()
    assert fetched["displayName"] == "Renamed"
    assert {m["value"] for m in fetched["members"]} == {b, c}


def test_patch_group_with_attributes_answers_the_resource(tenant, clean_db):
    """Given a Group
    When the IdP PATCHes with ?attributes=members (RFC 7644 §3.5.2: 200 with the resource)
    Then it gets 200 with the members."""
    a = create_users(tenant.client, 1)[0]
    group = create_group(tenant.client, "Team")
    response = tenant.client.patch(
        f"/Groups/{group['id']}",
        params={"attributes": "members"},
        json=patch_body({"op": "add", "path": "members", "value": [{"value": a}]}),
    )
    assert response.status_code == 200, response.text
    assert [m["value"] for m in response.json()["members"]] == [a]


def test_adding_an_existing_member_again_changes_nothing(tenant, clean_db):
    """Given a Group with member A
    When the IdP adds A again (RFC 7644 §3.5.2.1: an add of an existing value is no change)
    Then A is a member once and group_member still holds one row."""
    a = create_users(tenant.client, 1)[0]
    group = create_group(tenant.client, "Team", [a])
    response = tenant.client.patch(
        f"/Groups/{group['id']}", json=patch_body({"op": "add", "path": "members", "value": [{"value": a}]})
    )
    assert response.status_code in (200, 204), response.text
    assert member_ids(tenant.client, group["id"]) == {a}
    assert count_rows(clean_db, "group_member") == 1


def test_add_and_remove_many_members_in_one_patch(tenant, admin, clean_db):
    """Given 300 Users and an empty Group
    When the IdP adds all 300 in one PATCH operation, then removes 150 of them in one
    Then the Group has 300, then exactly the other 150 members, in GET, in group_member
    and in the admin's member count."""
    ids = create_users(tenant.client, 300)
    group = create_group(tenant.client, "Everyone")
    response = tenant.client.patch(
        f"/Groups/{group['id']}",
        json=patch_body({"op": "add", "path": "members", "value": [{"value": i} for i in ids]}),
    )
    assert response.status_code in (200, 204), response.text
    assert member_ids(tenant.client, group["id"]) == set(ids)
    assert count_rows(clean_db, "group_member", "group_id = :g", g=group["id"]) == 300

    gone, kept = ids[::2], ids[1::2]
    response = tenant.client.patch(
        f"/Groups/{group['id']}",
        json=patch_body({"op": "remove", "path": "members", "value": [{"value": i} for i in gone]}),
    )
    assert response.status_code in (200, 204), response.text
    assert member_ids(tenant.client, group["id"]) == set(kept)
    assert count_rows(clean_db, "group_member", "group_id = :g", g=group["id"]) == 150
    listed = admin.get(f"/tenants/{tenant.tenant_id}/groups").json()
    assert [(g["id"], g["members"]) for g in listed] == [(group["id"], 150)]
    assert events(clean_db, tenant.tenant_id)[-1] == ("group_updated", sorted(gone))


def test_replace_members_with_an_empty_list_empties_the_group(tenant, clean_db):
    """Given a Group with two members
    When the IdP replaces members with [] (RFC 7644 §3.5.2.3)
    Then the Group has no members and no group_member rows."""
    a, b = create_users(tenant.client, 2)
    group = create_group(tenant.client, "Team", [a, b])
    response = tenant.client.patch(
        f"/Groups/{group['id']}", json=patch_body({"op": "replace", "path": "members", "value": []})
    )
    assert response.status_code in (200, 204), response.text
    assert member_ids(tenant.client, group["id"]) == set()
    assert count_rows(clean_db, "group_member") == 0


def test_delete_group(tenant, admin, clean_db):
    """Given a Group with a member, mapped as the tenant's user group
    When the IdP DELETEs it (RFC 7644 §3.6)
    Then it answers 204; the Group is 404 afterwards and gone from lists; its member
    rows are gone and its mapping is only a tombstone (no longer mapped; kept with its
    display name to be restored if the IdP re-creates it); the User still exists with
    no groups; a group_deleted event re-evaluates the whole tenant."""
    user = create_user(tenant.client, "u@example.com")
    group = create_group(tenant.client, "Doomed", [user["id"]])
    saved = admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json={"user_groups": [group["id"]]})
    assert saved.status_code == 200, saved.text

    response = tenant.client.delete(f"/Groups/{group['id']}")
    assert response.status_code == 204
    assert_scim_error(tenant.client.get(f"/Groups/{group['id']}"), 404)
    assert_scim_error(tenant.client.delete(f"/Groups/{group['id']}"), 404)
    assert tenant.client.get("/Groups").json()["totalResults"] == 0
    assert count_rows(clean_db, "group_member") == 0
    assert count_rows(clean_db, "group_mapping", "deleted_at IS NULL") == 0
    assert count_rows(clean_db, "group_mapping", "deleted_at IS NOT NULL AND display_name = 'Doomed'") == 1
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json()["user_groups"] == []
    fetched_user = tenant.client.get(f"/Users/{user['id']}").json()
    assert "groups" not in fetched_user
    assert events(clean_db, tenant.tenant_id)[-1] == ("group_deleted", None)


def test_group_writes_append_sync_events(tenant, admin, clean_db):
    """Given a connected tenant and no worker
    When the IdP creates, patches, replaces and deletes a Group
    Then each write adds one event and events_applied stays 0."""
    before = sync_counts(admin, tenant.tenant_id)["events_total"]
    a = create_users(tenant.client, 1)[0]
    group = create_group(tenant.client, "G", [a])
    assert tenant.client.patch(
        f"/Groups/{group['id']}", json=patch_body({"op": "replace", "path": "displayName", "value": "G2"})
    ).status_code in (200, 204)
    assert tenant.client.put(f"/Groups/{group['id']}", json=group_body("G3")).status_code == 200
    assert tenant.client.delete(f"/Groups/{group['id']}").status_code == 204
    kinds = [kind for kind, _ in events(clean_db, tenant.tenant_id)]
    assert kinds == ["user_created", "group_created", "group_updated", "group_updated", "group_deleted"]
    sync = sync_counts(admin, tenant.tenant_id)
    assert sync["events_total"] == before + 5
    assert sync["events_applied"] == 0


def test_list_groups_pages(tenant, clean_db):
    """Given 5 Groups
    When the IdP pages with count=2 (RFC 7644 §3.4.2.4)
    Then three pages of 2, 2 and 1 carry every Group once, with totalResults 5."""
    ids = [create_group(tenant.client, f"Group {i}")["id"] for i in range(5)]
    seen = []
    for start, items in ((1, 2), (3, 2), (5, 1)):
        page = tenant.client.get("/Groups", params={"startIndex": start, "count": 2}).json()
        assert (page["totalResults"], page["startIndex"], page["itemsPerPage"]) == (5, start, items)
        seen += [r["id"] for r in page["Resources"]]
    assert sorted(seen) == sorted(ids)


def test_filter_groups_by_display_name_external_id_id_and_member(tenant, clean_db):
    """Given Groups
    When the IdP filters on displayName (caseExact false), externalId (caseExact true), id,
    and members.value (RFC 7644 §3.4.2.2)
    Then each filter finds exactly the right Groups."""
    user = create_user(tenant.client, "m@example.com")
    admins = create_group(tenant.client, "Admins", [user["id"]], externalId="EXT-1")
    create_group(tenant.client, "Users", externalId="ext-2")

    def ids(expression: str) -> list[str]:
        response = tenant.client.get("/Groups", params={"filter": expression})
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["Resources"]]

    assert ids('displayName eq "admins"') == [admins["id"]]
    assert ids('externalId eq "EXT-1"') == [admins["id"]]
    assert ids('externalId eq "ext-1"') == []
    assert ids(f'id eq "{admins["id"]}"') == [admins["id"]]
    assert ids(f'members.value eq "{user["id"]}"') == [admins["id"]]
    assert ids('displayName eq "nobody"') == []


@pytest.mark.parametrize(
    "expression",
    ['userName eq "x"', 'displayName xx "a"', '(displayName eq "a"', 'displayName eq Admins', 'meta.nope eq "x"', 'displayName eq 1'],
)
def test_bad_group_filters_are_400_invalid_filter(tenant, clean_db, expression):
    """Given a Group
    When the IdP filters Groups on an attribute Groups do not have, or with bad syntax
    Then it gets 400 invalidFilter (RFC 7644 §3.4.2.2), not an empty list."""
    create_group(tenant.client, "Admins")
    assert_scim_error(tenant.client.get("/Groups", params={"filter": expression}), 400, "invalidFilter")


def test_member_of_another_tenant_is_refused(tenant, admin, clean_db):
    """Given a User and a Group of another tenant, and a User of this one
    When the IdP adds the foreign id (alone, or beside this tenant's User) to a Group of this tenant (POST or PATCH)
    Then it gets 400 invalidValue naming the foreign id, and nothing in the database changed."""
    from tests.conftest import connect_tenant

    other = connect_tenant(admin, "Other")
    try:
        foreign_user = create_user(other.client, "foreign@example.com")["id"]
        foreign_group = create_group(other.client, "Theirs")["id"]
        mine = create_user(tenant.client, "mine@example.com")["id"]
        group = create_group(tenant.client, "Mine")
        before = snapshot(clean_db)
        for foreign in (foreign_user, foreign_group):
            for members in ([foreign], [mine, foreign]):
                assert_scim_error(
                    tenant.client.post("/Groups", json=group_body("With foreigner", members)), 400, "invalidValue"
                )
                response = tenant.client.patch(
                    f"/Groups/{group['id']}",
                    json=patch_body({"op": "add", "path": "members", "value": [{"value": m} for m in members]}),
                )
                assert_scim_error(response, 400, "invalidValue")
                assert foreign in response.json()["detail"]
        assert snapshot(clean_db) == before
    finally:
        other.client.close()


def test_excluded_members_on_list(tenant, clean_db):
    """Given a Group with a member
    When the IdP lists Groups with excludedAttributes=members (RFC 7644 §3.4.2.5)
    Then no listed Group carries a "members" key; without it, members are listed."""
    user = create_user(tenant.client, "x@example.com")
    create_group(tenant.client, "G", [user["id"]])
    without = tenant.client.get("/Groups", params={"excludedAttributes": "members"}).json()["Resources"]
    assert len(without) == 1 and "members" not in without[0]
    with_members = tenant.client.get("/Groups").json()["Resources"]
    assert [m["value"] for m in with_members[0]["members"]] == [user["id"]]
