"""Microsoft Entra ID's SCIM dialect (default mode), as its provisioning service sends it.

The request shapes follow Microsoft's "Tutorial: Develop and plan provisioning for a
SCIM endpoint in Microsoft Entra ID" (section "Protocol requests and responses"):
capitalised ops, booleans as strings, members as [{"$ref": null, "value": id}],
removal of members by value list, group reads with excludedAttributes=members,
POST bodies carrying the read-only `meta` and the EnterpriseUser extension.
"""

from __future__ import annotations

import copy
import uuid

import pytest

from tests.api.helpers import (
    ENTERPRISE_SCHEMA,
    GROUP_SCHEMA,
    PATCH_OP,
    USER_SCHEMA,
    count_rows,
    create_users,
    member_ids,
    snapshot,
)

# "Create User" request of the tutorial (ids and names made unique per test).
ENTRA_CREATE_USER = {
    "schemas": [USER_SCHEMA, ENTERPRISE_SCHEMA],
    "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
    "userName": "Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1",
    "active": True,
    "emails": [{"primary": True, "type": "work", "value": "Test_User_fd0ea19b-0777-472c-9f96-4f70d2226f2e@testuser.com"}],
    "meta": {"resourceType": "User"},
    "name": {"formatted": "givenName familyName", "familyName": "familyName", "givenName": "givenName"},
    "roles": [],
    ENTERPRISE_SCHEMA: {
        "employeeNumber": "701984",
        "costCenter": "4130",
        "department": "Tour Operations",
        "manager": {"value": "26118915-6090-4610-87e4-49d8ca9f808d"},
    },
}

# "Create Group" request of the tutorial: Entra also names its own AD schema.
ENTRA_CREATE_GROUP = {
    "schemas": [GROUP_SCHEMA, "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"],
    "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
    "displayName": "displayName",
    "meta": {"resourceType": "Group"},
}


def entra_patch(*operations: dict) -> dict:
    # Entra puts "schemas" first and capitalises "op".
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


def entra_members(*ids: str) -> list[dict]:
    return [{"$ref": None, "value": member_id} for member_id in ids]


def entra_user(suffix: str | None = None) -> dict:
    body = copy.deepcopy(ENTRA_CREATE_USER)
    suffix = suffix or uuid.uuid4().hex
    body["userName"] = f"Test_User_{suffix}@testuser.com"
    body["externalId"] = suffix
    return body


def post_user(tenant, body: dict) -> dict:
    response = tenant.client.post("/Users", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def post_group(tenant, name: str = "displayName", members: list[str] | None = None) -> dict:
    body = copy.deepcopy(ENTRA_CREATE_GROUP)
    body["displayName"] = name
    body["externalId"] = uuid.uuid4().hex
    if members is not None:
        body["members"] = entra_members(*members)
    response = tenant.client.post("/Groups", json=body)
    assert response.status_code == 201, response.text
    return response.json()


# ------------------------------------------------------------------ test connection


def test_test_connection_query_for_a_random_user_name(tenant, clean_db):
    """Given a freshly connected tenant (and one unrelated User)
    When Entra's "Test Connection" asks GET /Users?filter=userName eq "<random uuid>"
    Then it gets 200 with totalResults 0 and an empty Resources list (RFC 7644 §3.4.2)."""
    post_user(tenant, entra_user())
    response = tenant.client.get("/Users", params={"filter": f'userName eq "{uuid.uuid4()}"'})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["totalResults"] == 0
    assert body["Resources"] == []
    assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:ListResponse"]


# ------------------------------------------------------------------ users


def test_create_user_with_meta_and_enterprise_extension_round_trips(tenant, clean_db):
    """Given Entra's Create User body, with read-only `meta` and the EnterpriseUser extension
    When it is POSTed (RFC 7643 §3.1: meta is readOnly; §4.3: the enterprise extension)
    Then it gets 201; the extension (department, manager, …) comes back as sent, on the answer,
    on a GET and on a filter by userName; meta is the server's, not the client's."""
    body = entra_user()
    created = post_user(tenant, body)
    assert ENTERPRISE_SCHEMA in created["schemas"]
    assert created[ENTERPRISE_SCHEMA] == body[ENTERPRISE_SCHEMA]
    assert created["meta"]["resourceType"] == "User"
    assert created["meta"]["location"].endswith(f"/Users/{created['id']}")
    assert created["externalId"] == body["externalId"]
    assert created["emails"] == body["emails"]
    assert created["name"] == body["name"]

    fetched = tenant.client.get(f"/Users/{created['id']}").json()
    assert fetched[ENTERPRISE_SCHEMA]["department"] == "Tour Operations"
    assert fetched[ENTERPRISE_SCHEMA]["manager"] == {"value": "26118915-6090-4610-87e4-49d8ca9f808d"}
    listed = tenant.client.get("/Users", params={"filter": f'userName eq "{body["userName"]}"'}).json()
    assert listed["Resources"] == [fetched]


def test_filter_by_external_id_as_entra_matches_users(tenant, clean_db):
    """Given a User created by Entra
    When Entra looks it up by externalId (its matching attribute, RFC 7644 §3.4.2.2)
    Then it gets that one User."""
    created = post_user(tenant, entra_user("match-me"))
    response = tenant.client.get("/Users", params={"filter": 'externalId eq "match-me"'})
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()["Resources"]] == [created["id"]]


@pytest.mark.parametrize(
    "disable, enable",
    [
        # path + string value: Entra's default mode
        ({"op": "Replace", "path": "active", "value": "False"}, {"op": "Replace", "path": "active", "value": "True"}),
        # pathless value object, also seen from Entra
        ({"op": "Replace", "value": {"active": "False"}}, {"op": "Replace", "value": {"active": "True"}}),
        # lowercase strings
        ({"op": "replace", "path": "active", "value": "false"}, {"op": "replace", "path": "active", "value": "true"}),
    ],
    ids=["path", "pathless", "lowercase"],
)
def test_boolean_as_string_deactivates_and_reactivates(tenant, admin, clean_db, disable, enable):
    """Given an active User
    When Entra PATCHes active with the string "False", then "True" (default mode quirk)
    Then the User is inactive (active is the JSON boolean false), then active again,
    in the answers, on a GET and in the admin's user list."""
    user = post_user(tenant, entra_user())
    response = tenant.client.patch(f"/Users/{user['id']}", json=entra_patch(disable))
    assert response.status_code == 200, response.text
    assert response.json()["active"] is False
    assert tenant.client.get(f"/Users/{user['id']}").json()["active"] is False
    assert [u["active"] for u in admin.get(f"/tenants/{tenant.tenant_id}/users").json()] == [False]
    inactive = tenant.client.get("/Users", params={"filter": "active eq false"}).json()
    assert [r["id"] for r in inactive["Resources"]] == [user["id"]]

    response = tenant.client.patch(f"/Users/{user['id']}", json=entra_patch(enable))
    assert response.status_code == 200, response.text
    assert response.json()["active"] is True
    assert tenant.client.get(f"/Users/{user['id']}").json()["active"] is True


def test_update_user_multi_valued_and_single_valued_properties(tenant, clean_db):
    """Given a User created by Entra
    When Entra sends the tutorial's "Update User [Multi-valued properties]" and
    "[Single-valued properties]" PATCHes (capitalised ops, valuePath filter, RFC 7644 §3.5.2)
    Then the work email, family name and userName change as sent."""
    user = post_user(tenant, entra_user())
    response = tenant.client.patch(
        f"/Users/{user['id']}",
        json=entra_patch(
            {"op": "Replace", "path": 'emails[type eq "work"].value', "value": "updatedEmail@microsoft.com"},
            {"op": "Replace", "path": "name.familyName", "value": "updatedFamilyName"},
        ),
    )
    assert response.status_code == 200, response.text
    assert response.json()["emails"][0]["value"] == "updatedEmail@microsoft.com"
    assert response.json()["name"]["familyName"] == "updatedFamilyName"

    new_name = f"{uuid.uuid4()}@testuser.com"
    response = tenant.client.patch(
        f"/Users/{user['id']}", json=entra_patch({"op": "Replace", "path": "userName", "value": new_name})
    )
    assert response.status_code == 200, response.text
    assert tenant.client.get(f"/Users/{user['id']}").json()["userName"] == new_name


def test_pathless_replace_with_dotted_and_extension_keys(tenant, clean_db):
    """Given a User created by Entra
    When Entra sends a pathless Replace whose value holds dotted keys and extension URN keys
    Then each key is applied as the path it names (name.givenName, enterprise department)."""
    user = post_user(tenant, entra_user())
    response = tenant.client.patch(
        f"/Users/{user['id']}",
        json=entra_patch(
            {
                "op": "Replace",
                "value": {
                    "name.givenName": "Grace",
                    f"{ENTERPRISE_SCHEMA}:department": "Research",
                    "displayName": "Grace H",
                },
            }
        ),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["name"]["givenName"] == "Grace"
    assert body["displayName"] == "Grace H"
    assert body[ENTERPRISE_SCHEMA]["department"] == "Research"
    assert body[ENTERPRISE_SCHEMA]["costCenter"] == "4130"  # untouched


def test_enterprise_manager_by_patch(tenant, clean_db):
    """Given two Users
    When Entra sets the manager with the extension path and a plain id string, then removes it
    Then the manager is {"value": id}, then gone (RFC 7643 §4.3)."""
    boss = post_user(tenant, entra_user())
    worker = post_user(tenant, entra_user())
    path = f"{ENTERPRISE_SCHEMA}:manager"
    response = tenant.client.patch(
        f"/Users/{worker['id']}", json=entra_patch({"op": "Add", "path": path, "value": boss["id"]})
    )
    assert response.status_code == 200, response.text
    assert response.json()[ENTERPRISE_SCHEMA]["manager"] == {"value": boss["id"]}
    response = tenant.client.patch(f"/Users/{worker['id']}", json=entra_patch({"op": "Remove", "path": path}))
    assert response.status_code == 200, response.text
    assert "manager" not in response.json()[ENTERPRISE_SCHEMA]


def test_delete_user_as_entra(tenant, clean_db):
    """Given a User created by Entra
    When Entra DELETEs it (RFC 7644 §3.6)
    Then 204, and Entra's existence check (filter by userName) finds nothing."""
    body = entra_user()
    user = post_user(tenant, body)
    assert tenant.client.delete(f"/Users/{user['id']}").status_code == 204
    found = tenant.client.get("/Users", params={"filter": f'userName eq "{body["userName"]}"'}).json()
    assert (found["totalResults"], found["Resources"]) == (0, [])


# ------------------------------------------------------------------ groups


def test_create_group_with_meta_and_ad_schema(tenant, clean_db):
    """Given Entra's Create Group body (read-only meta, Microsoft's ADSCIM schema URN)
    When it is POSTed
    Then it gets 201 with the displayName and externalId, and an empty member list."""
    created = post_group(tenant, "Tour Operations")
    assert created["displayName"] == "Tour Operations"
    assert created["meta"]["resourceType"] == "Group"
    assert created.get("members", []) == []
    assert count_rows(clean_db, "scim_group") == 1


def test_add_members_with_null_ref(tenant, clean_db):
    """Given Users and an empty Group
    When Entra adds members as [{"$ref": null, "value": id}] with op "Add"
    Then the Group has exactly those members."""
    ids = create_users(tenant.client, 3)
    group = post_group(tenant)
    response = tenant.client.patch(
        f"/Groups/{group['id']}", json=entra_patch({"op": "Add", "path": "members", "value": entra_members(*ids)})
    )
    assert response.status_code in (200, 204), response.text
    assert member_ids(tenant.client, group["id"]) == set(ids)


def test_remove_one_member_by_value_list_keeps_the_others(tenant, admin, clean_db):
    """Given a Group of 3 members
    When Entra sends {"op":"Remove","path":"members","value":[{"value": id}]}
    Then exactly that member is removed: 2 remain (never all), in GET, in
    group_member and in the admin's member count."""
    a, b, c = create_users(tenant.client, 3)
    group = post_group(tenant, "Three", [a, b, c])
    response = tenant.client.patch(
        f"/Groups/{group['id']}",
        json=entra_patch({"op": "Remove", "path": "members", "value": [{"value": b}]}),
    )
    assert response.status_code in (200, 204), response.text
    assert member_ids(tenant.client, group["id"]) == {a, c}
    assert count_rows(clean_db, "group_member", "group_id = :g", g=group["id"]) == 2
    assert [g["members"] for g in admin.get(f"/tenants/{tenant.tenant_id}/groups").json()] == [2]


def test_remove_members_with_null_ref_value_list(tenant, clean_db):
    """Given a Group of 3 members
    When Entra removes two of them with the tutorial's shape [{"$ref": null, "value": id}]
    Then only the third remains."""
    a, b, c = create_users(tenant.client, 3)
    group = post_group(tenant, "Three", [a, b, c])
    response = tenant.client.patch(
        f"/Groups/{group['id']}", json=entra_patch({"op": "Remove", "path": "members", "value": entra_members(a, c)})
    )
    assert response.status_code in (200, 204), response.text
    assert member_ids(tenant.client, group["id"]) == {b}


def test_remove_of_a_non_member_removes_nothing(tenant, clean_db):
    """Given a Group of 2 members and a third User outside it
    When Entra removes the outsider by value list
    Then both members stay."""
    a, b, outsider = create_users(tenant.client, 3)
    group = post_group(tenant, "Two", [a, b])
    response = tenant.client.patch(
        f"/Groups/{group['id']}",
        json=entra_patch({"op": "Remove", "path": "members", "value": [{"value": outsider}]}),
    )
    assert response.status_code in (200, 204), response.text
    assert member_ids(tenant.client, group["id"]) == {a, b}


def test_group_reads_with_excluded_members(tenant, clean_db):
    """Given a Group with members
    When Entra reads it with excludedAttributes=members, by id and by displayName filter
    Then neither answer has a "members" key (RFC 7644 §3.9), and the other attributes are there."""
    ids = create_users(tenant.client, 2)
    group = post_group(tenant, "Readers", ids)
    response = tenant.client.get(f"/Groups/{group['id']}", params={"excludedAttributes": "members"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "members" not in body
    assert (body["id"], body["displayName"]) == (group["id"], "Readers")

    listed = tenant.client.get(
        "/Groups", params={"excludedAttributes": "members", "filter": 'displayName eq "Readers"'}
    )
    assert listed.status_code == 200, listed.text
    resources = listed.json()["Resources"]
    assert [r["id"] for r in resources] == [group["id"]]
    assert "members" not in resources[0]


def test_update_group_display_name(tenant, clean_db):
    """Given a Group
    When Entra sends the tutorial's "Update Group [Non-member attributes]" Replace of displayName
    Then the new name is read back and members are untouched."""
    ids = create_users(tenant.client, 1)
    group = post_group(tenant, "Before", ids)
    new_name = "1879db59-3bdf-4490-ad68-ab880a269474updatedDisplayName"
    response = tenant.client.patch(
        f"/Groups/{group['id']}", json=entra_patch({"op": "Replace", "path": "displayName", "value": new_name})
    )
    assert response.status_code in (200, 204), response.text
    body = tenant.client.get(f"/Groups/{group['id']}").json()
    assert body["displayName"] == new_name
    assert {m["value"] for m in body["members"]} == set(ids)


def test_unknown_member_from_entra_changes_nothing(tenant, clean_db):
    """Given a Group of 1 member
    When Entra adds a member id this tenant does not have
    Then 400 invalidValue and the database is unchanged."""
    ids = create_users(tenant.client, 1)
    group = post_group(tenant, "One", ids)
    before = snapshot(clean_db)
    response = tenant.client.patch(
        f"/Groups/{group['id']}",
        json=entra_patch({"op": "Add", "path": "members", "value": entra_members(str(uuid.uuid4()))}),
    )
    assert response.status_code == 400, response.text
    assert response.json()["scimType"] == "invalidValue"
    assert snapshot(clean_db) == before
