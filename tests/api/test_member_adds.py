"""Group PATCHes that only add members (RFC 7644 §3.5.2.1): on PostgreSQL one statement, on SQLite the
general path; the same answers, rows, versions and sync events on both."""

from __future__ import annotations

import pytest

from api.scim.fastpath import added_members
from models.settings import Settings
from tests.api.helpers import (
    PATCH_OP,
    assert_scim_error,
    count_rows,
    create_group,
    create_user,
    create_users,
    events,
    member_ids,
    patch_body,
    snapshot,
)

LIMITS = Settings().scim_limits


def _adds(*values: str, op: str = "add") -> dict:
    return {"op": op, "path": "members", "value": [{"value": v} for v in values]}


def _version(client, group_id: str) -> str:
    return client.get(f"/Groups/{group_id}").json()["meta"]["version"]


def test_entra_add_members_patch_adds_rows_bumps_version_and_records_new_users(tenant, clean_db):
    """Given a Group with member A, and Users B, C and a Group N
    When Entra PATCHes "Add" members [A, B, B, N] and a second "Add" of [C] ("$ref": null on each)
    Then it answers 204 with the group's next version as ETag; the group holds A, B, C and N,
    one row each; and one group_updated event names the Users added by this PATCH (B and C,
    sorted), neither A (already a member) nor the Group N."""
    a, b, c = create_users(tenant.client, 3)
    nested = create_group(tenant.client, "Nested")
    group = create_group(tenant.client, "Team", [a])
    before = _version(tenant.client, group["id"])
    body = {
        "schemas": [PATCH_OP],
        "Operations": [
            {"op": "Add", "path": "members",
             "value": [{"value": a, "$ref": None}, {"value": b, "$ref": None}, {"value": b, "$ref": None},
                       {"value": nested["id"], "$ref": None}]},
            {"op": "Add", "path": "members", "value": [{"value": c, "$ref": None}]},
        ],
    }
    response = tenant.client.patch(f"/Groups/{group['id']}", json=body)
    assert response.status_code == 204, response.text
    after = _version(tenant.client, group["id"])
    assert response.headers["etag"] == after
    assert int(after.strip('W/"')) == int(before.strip('W/"')) + 1
    assert member_ids(tenant.client, group["id"]) == {a, b, c, nested["id"]}
    assert count_rows(clean_db, "group_member", "group_id = :g", g=group["id"]) == 4
    types = {m["value"]: m["type"] for m in tenant.client.get(f"/Groups/{group['id']}").json()["members"]}
    assert types[nested["id"]] == "Group" and types[b] == "User"
    assert events(clean_db, tenant.tenant_id)[-1] == ("group_updated", sorted([b, c]))


def test_adding_only_existing_members_still_bumps_and_records_an_empty_event(tenant, clean_db):
    """Given a Group with members A and B
    When the IdP adds A and B again
    Then it answers 204, the rows are unchanged, the version moves on (a write happened), and the
    event names no user (nothing about anyone's access changed)."""
    a, b = create_users(tenant.client, 2)
    group = create_group(tenant.client, "Team", [a, b])
    before = _version(tenant.client, group["id"])
    response = tenant.client.patch(f"/Groups/{group['id']}", json=patch_body(_adds(a, b)))
    assert response.status_code == 204, response.text
    assert _version(tenant.client, group["id"]) != before
    assert count_rows(clean_db, "group_member", "group_id = :g", g=group["id"]) == 2
    assert events(clean_db, tenant.tenant_id)[-1] == ("group_updated", [])


@pytest.mark.parametrize("which", ["unknown", "deleted"])
def test_one_unknown_member_refuses_the_whole_patch_and_changes_nothing(tenant, clean_db, which):
    """Given a Group and 20 Users, and an id that is no member of the tenant (never existed, or a deleted User)
    When the IdP adds the 20 Users and that id in one PATCH
    Then it answers 400 invalidValue naming that id, and no row, version or event changed."""
    ids = create_users(tenant.client, 20)
    group = create_group(tenant.client, "Team")
    if which == "unknown":
        stranger = "no-such-user-0001"
    else:
        stranger = create_user(tenant.client, "gone@example.com")["id"]
        assert tenant.client.delete(f"/Users/{stranger}").status_code == 204
    before = snapshot(clean_db)
    response = tenant.client.patch(f"/Groups/{group['id']}", json=patch_body(_adds(*ids[:10], stranger, *ids[10:])))
    assert_scim_error(response, 400, "invalidValue")
    assert stranger in response.json()["detail"]
    assert ids[0] not in response.json()["detail"]
    assert snapshot(clean_db) == before


def test_add_to_an_unknown_group_is_404_and_a_bad_token_401(tenant, clean_db):
    """Given a User
    When the IdP adds it to a group id that does not exist, or with a wrong token
    Then it gets 404, then 401, and nothing changed."""
    user = create_user(tenant.client, "u@example.com")["id"]
    group = create_group(tenant.client, "Team")
    before = snapshot(clean_db)
    assert_scim_error(tenant.client.patch("/Groups/no-such-group", json=patch_body(_adds(user))), 404)
    response = tenant.client.patch(
        f"/Groups/{group['id']}", json=patch_body(_adds(user)), headers={"Authorization": "Bearer wrong"}
    )
    assert response.status_code == 401
    assert snapshot(clean_db) == before


def test_a_group_added_to_itself_is_refused(tenant, clean_db):
    """Given a Group
    When the IdP adds the group's own id to its members
    Then it gets 400 invalidValue and nothing changed."""
    user = create_user(tenant.client, "u@example.com")["id"]
    group = create_group(tenant.client, "Team")
    before = snapshot(clean_db)
    assert_scim_error(tenant.client.patch(f"/Groups/{group['id']}", json=patch_body(_adds(user, group["id"]))),
                      400, "invalidValue")
    assert snapshot(clean_db) == before


def test_add_members_with_a_stale_if_match_is_412(tenant, clean_db):
    """Given a Group at some version
    When the IdP adds a member with If-Match of another version (RFC 7644 §3.14)
    Then it gets 412 and nothing changed; with the current version the add succeeds."""
    user = create_user(tenant.client, "u@example.com")["id"]
    group = create_group(tenant.client, "Team")
    before = snapshot(clean_db)
    response = tenant.client.patch(f"/Groups/{group['id']}", json=patch_body(_adds(user)),
                                   headers={"If-Match": 'W/"999"'})
    assert_scim_error(response, 412)
    assert snapshot(clean_db) == before
    current = _version(tenant.client, group["id"])
    response = tenant.client.patch(f"/Groups/{group['id']}", json=patch_body(_adds(user)), headers={"If-Match": current})
    assert response.status_code == 204, response.text
    assert member_ids(tenant.client, group["id"]) == {user}


# ------------------------------------------------------------ which PATCHes take the one-statement path


def test_added_members_reads_entra_and_okta_adds_in_order_without_duplicates():
    """The add-only shapes IdPs send are recognised: ids in order, each once."""
    entra = {"schemas": [PATCH_OP], "Operations": [
        {"op": "Add", "path": "members", "value": [{"value": "b", "$ref": None}, {"value": "a"}, {"value": "b"}]},
        {"op": "add", "path": "members", "value": [{"value": "c", "type": "User", "display": "C"}]},
    ]}
    assert added_members(entra, LIMITS) == ["b", "a", "c"]
    assert added_members({"Operations": [_adds("x")]}, LIMITS) == ["x"]
    assert added_members({"schemas": [PATCH_OP], "Operations": [_adds()]}, LIMITS) == []


@pytest.mark.parametrize("body", [
    None,
    [],
    {"schemas": ["urn:other"], "Operations": [_adds("a")]},
    {"schemas": [PATCH_OP]},
    {"schemas": [PATCH_OP], "Operations": []},
    {"schemas": [PATCH_OP], "Operations": [_adds("a", op="remove")]},
    {"schemas": [PATCH_OP], "Operations": [_adds("a", op="replace")]},
    {"schemas": [PATCH_OP], "Operations": [_adds("a"), _adds("b", op="remove")]},
    {"schemas": [PATCH_OP], "Operations": [{"op": "add", "path": 'members[value eq "a"]', "value": [{"value": "a"}]}]},
    {"schemas": [PATCH_OP], "Operations": [{"op": "add", "path": "displayName", "value": "x"}]},
    {"schemas": [PATCH_OP], "Operations": [{"op": "add", "value": {"members": [{"value": "a"}]}}]},
    {"schemas": [PATCH_OP], "Operations": [{"op": "add", "path": "members", "value": {"value": "a"}}]},
    {"schemas": [PATCH_OP], "Operations": [{"op": "add", "path": "members", "value": [{"value": ""}]}]},
    {"schemas": [PATCH_OP], "Operations": [{"op": "add", "path": "members", "value": [{"value": 7}]}]},
    {"schemas": [PATCH_OP], "Operations": [{"op": "add", "path": "members", "value": ["a"]}]},
    {"schemas": [PATCH_OP], "Operations": [{"op": "add", "path": "members", "value": [{"value": "a", "type": "Device"}]}]},
])
def test_added_members_leaves_every_other_patch_to_the_general_path(body):
    """Anything but plain member adds (or what the Patcher would refuse) is None: the general path answers it."""
    assert added_members(body, LIMITS) is None


def test_added_members_leaves_patches_past_the_limits_to_the_general_path():
    """A PATCH past SCIM_MAX_MEMBERS or SCIM_MAX_PATCH_OPERATIONS gets the general path's error, not a new one."""
    too_many = {"schemas": [PATCH_OP], "Operations": [_adds(*(f"u{i}" for i in range(LIMITS.max_members + 1)))]}
    assert added_members(too_many, LIMITS) is None
    too_many_ops = {"schemas": [PATCH_OP], "Operations": [_adds("a")] * (LIMITS.max_patch_operations + 1)}
    assert added_members(too_many_ops, LIMITS) is None
    at_limit = {"schemas": [PATCH_OP], "Operations": [_adds(*(f"u{i}" for i in range(LIMITS.max_members)))]}
    assert added_members(at_limit, LIMITS) is not None
