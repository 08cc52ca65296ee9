"""SCIM Users under the Tenant URL: create, read, replace, patch, delete, list and filter (RFC 7644 §3)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from tests.api.helpers import (
    LIST_RESPONSE,
    USER_SCHEMA,
    assert_scim_error,
    count_rows,
    create_group,
    create_user,
    events,
    member_ids,
    patch_body,
    sync_counts,
    user_body,
)

# ------------------------------------------------------------------ create and read


def test_create_user_answers_the_resource_and_a_get_sees_it(tenant, admin, clean_db):
    """Given a connected tenant
    When the IdP POSTs a User (RFC 7644 §3.3)
    Then it gets 201 with the resource, its id, meta and a Location header,
    and a GET of that Location right after answers the same User."""
    response = tenant.client.post(
        "/Users",
        json=user_body(
            "Ada@Example.com",
            externalId="ext-ada",
            displayName="Ada Lovelace",
            name={"givenName": "Ada", "familyName": "Lovelace"},
            emails=[{"value": "ada@example.com", "type": "work", "primary": True}],
        ),
    )
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/scim+json")
    created = response.json()
    assert created["schemas"] == [USER_SCHEMA]
    assert created["userName"] == "Ada@Example.com"  # stored as sent, not case-folded
    assert created["externalId"] == "ext-ada"
    assert created.get("active", True) is True  # not sent: shown as sent (absent) or as true
    assert created["name"] == {"givenName": "Ada", "familyName": "Lovelace"}
    assert created["meta"]["resourceType"] == "User"
    location = created["meta"]["location"]
    assert location == f"{tenant.tenant_url}/Users/{created['id']}"
    assert response.headers["location"] == location
    assert response.headers["etag"] == created["meta"]["version"]

    fetched = tenant.client.get(location)
    assert fetched.status_code == 200, fetched.text
    assert fetched.json() == created
    # A User created without `active` counts as active (RFC 7643 §4.1.1).
    assert [u["active"] for u in admin.get(f"/tenants/{tenant.tenant_id}/users").json()] == [True]


def test_create_user_ignores_client_supplied_id_and_never_returns_password(tenant, clean_db):
    """Given a POST carrying an `id` and a `password`
    When the User is created
    Then the server issues its own id (RFC 7643 §3.1: id is readOnly)
    and the password is never returned (RFC 7643 §4.1.1: returned "never")."""
    response = tenant.client.post("/Users", json=user_body("pw@example.com", id="chosen-by-client", password="s3cret!"))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] != "chosen-by-client"
    assert "password" not in body
    assert "password" not in tenant.client.get(f"/Users/{body['id']}").json()
    with clean_db.connect() as connection:
        stored = connection.execute(text("SELECT data FROM scim_user WHERE id = :i"), {"i": body["id"]}).scalar_one()
    assert "s3cret!" not in str(stored)


def test_user_write_appends_sync_events_in_the_same_transaction(tenant, admin, clean_db):
    """Given a connected tenant and no worker running
    When the IdP creates, replaces, patches and deletes a User
    Then each accepted write appended one sync event naming the user,
    and …/sync shows events_total growing while events_applied stays 0."""
    assert sync_counts(admin, tenant.tenant_id)["events_total"] == 0
    user = create_user(tenant.client, "events@example.com")
    assert sync_counts(admin, tenant.tenant_id)["events_total"] == 1

    assert tenant.client.put(f"/Users/{user['id']}", json=user_body("events@example.com", title="CTO")).status_code == 200
    patched = tenant.client.patch(
        f"/Users/{user['id']}", json=patch_body({"op": "replace", "path": "title", "value": "CEO"})
    )
    assert patched.status_code == 200, patched.text
    assert tenant.client.delete(f"/Users/{user['id']}").status_code == 204

    assert events(clean_db, tenant.tenant_id) == [
        ("user_created", [user["id"]]),
        ("user_updated", [user["id"]]),
        ("user_updated", [user["id"]]),
        ("user_deleted", [user["id"]]),
    ]
    sync = sync_counts(admin, tenant.tenant_id)
    assert sync["events_total"] == 4
    assert sync["events_applied"] == 0


# ------------------------------------------------------------------ replace (PUT)


def test_put_replaces_the_whole_user(tenant, admin, clean_db):
    """Given a User with a title and a phone number
    When the IdP PUTs a body without them (RFC 7644 §3.5.1: PUT replaces the resource)
    Then the answer and a later GET no longer carry them, the new values are there,
    and the version (meta.version/ETag) changed."""
    user = create_user(
        tenant.client, "put@example.com", title="Engineer", phoneNumbers=[{"value": "+1 555", "type": "work"}]
    )
    response = tenant.client.put(
        f"/Users/{user['id']}",
        json=user_body("PUT@example.com", displayName="Put Person", active=False, externalId="ext-put"),
    )
    assert response.status_code == 200, response.text
    replaced = response.json()
    assert replaced["id"] == user["id"]
    assert replaced["userName"] == "PUT@example.com"
    assert replaced["displayName"] == "Put Person"
    assert replaced["active"] is False
    assert replaced["externalId"] == "ext-put"
    assert "title" not in replaced and "phoneNumbers" not in replaced
    assert replaced["meta"]["version"] != user["meta"]["version"]
    assert replaced["meta"]["created"] == user["meta"]["created"]
    assert tenant.client.get(f"/Users/{user['id']}").json() == replaced
    assert [u["active"] for u in admin.get(f"/tenants/{tenant.tenant_id}/users").json()] == [False]


def test_put_keeps_group_memberships(tenant, clean_db):
    """Given a User in a group
    When the IdP PUTs the User (groups is readOnly on the User, RFC 7643 §4.1.2)
    Then the membership is untouched and the User still shows its group."""
    user = create_user(tenant.client, "member@example.com")
    group = create_group(tenant.client, "Staff", [user["id"]])
    response = tenant.client.put(f"/Users/{user['id']}", json=user_body("member@example.com", groups=[]))
    assert response.status_code == 200, response.text
    assert [g["value"] for g in response.json()["groups"]] == [group["id"]]
    assert member_ids(tenant.client, group["id"]) == {user["id"]}


# ------------------------------------------------------------------ patch


def test_patch_user_add_replace_remove(tenant, clean_db):
    """Given a User
    When the IdP PATCHes it with add, replace and remove operations (RFC 7644 §3.5.2.1–3)
    Then the answer (200 with the resource) and a later GET show exactly those changes."""
    user = create_user(
        tenant.client,
        "patch@example.com",
        name={"givenName": "Pat", "familyName": "Old"},
        emails=[{"value": "pat@work.example", "type": "work", "primary": True}],
        title="Intern",
    )
    response = tenant.client.patch(
        f"/Users/{user['id']}",
        json=patch_body(
            {"op": "replace", "path": "name.familyName", "value": "New"},
            {"op": "replace", "path": 'emails[type eq "work"].value', "value": "pat@new.example"},
            {"op": "add", "path": "emails", "value": [{"value": "pat@home.example", "type": "home"}]},
            {"op": "add", "path": "nickName", "value": "Patty"},
            {"op": "remove", "path": "title"},
        ),
    )
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched["name"] == {"givenName": "Pat", "familyName": "New"}
    assert {(e["type"], e["value"]) for e in patched["emails"]} == {
        ("work", "pat@new.example"),
        ("home", "pat@home.example"),
    }
    assert patched["nickName"] == "Patty"
    assert "title" not in patched
    assert tenant.client.get(f"/Users/{user['id']}").json() == patched


def test_patch_user_name_to_a_free_name_frees_the_old_one(tenant, clean_db):
    """Given a User renamed by PATCH (RFC 7644 §3.5.2.3)
    When another User is created with the old userName
    Then that creation succeeds (201) and filters find each name once."""
    user = create_user(tenant.client, "old-name@example.com")
    response = tenant.client.patch(
        f"/Users/{user['id']}", json=patch_body({"op": "replace", "path": "userName", "value": "new-name@example.com"})
    )
    assert response.status_code == 200, response.text
    assert response.json()["userName"] == "new-name@example.com"
    create_user(tenant.client, "OLD-NAME@example.com")
    found = tenant.client.get("/Users", params={"filter": 'userName eq "new-name@example.com"'}).json()
    assert [r["id"] for r in found["Resources"]] == [user["id"]]


def test_patch_external_id(tenant, clean_db):
    """Given a User with an externalId
    When the IdP replaces externalId by PATCH (RFC 7643 §3.1: externalId is readWrite)
    Then the new externalId is answered and a filter on it finds the User."""
    user = create_user(tenant.client, "ext@example.com", externalId="old-ext")
    response = tenant.client.patch(
        f"/Users/{user['id']}", json=patch_body({"op": "replace", "path": "externalId", "value": "new-ext"})
    )
    assert response.status_code == 200, response.text
    assert response.json()["externalId"] == "new-ext"
    found = tenant.client.get("/Users", params={"filter": 'externalId eq "new-ext"'})
    assert found.status_code == 200, found.text
    assert [r["id"] for r in found.json()["Resources"]] == [user["id"]]


# ------------------------------------------------------------------ delete


def test_deleted_user_is_gone_from_reads_lists_and_groups_but_kept_in_the_database(tenant, admin, clean_db):
    """Given a User who is a member of a group
    When the IdP DELETEs it (RFC 7644 §3.6)
    Then it answers 204; the User is 404 afterwards, gone from lists and filters,
    gone from its group's members; its row stays with deleted_at set;
    the admin sees it with status "deleted"."""
    user = create_user(tenant.client, "leaver@example.com")
    stayer = create_user(tenant.client, "stayer@example.com")
    group = create_group(tenant.client, "Team", [user["id"], stayer["id"]])

    response = tenant.client.delete(f"/Users/{user['id']}")
    assert response.status_code == 204
    assert response.content == b""

    assert_scim_error(tenant.client.get(f"/Users/{user['id']}"), 404)
    assert_scim_error(tenant.client.delete(f"/Users/{user['id']}"), 404)
    listed = tenant.client.get("/Users").json()
    assert [r["id"] for r in listed["Resources"]] == [stayer["id"]]
    assert listed["totalResults"] == 1
    assert tenant.client.get("/Users", params={"filter": 'userName eq "leaver@example.com"'}).json()["totalResults"] == 0
    assert member_ids(tenant.client, group["id"]) == {stayer["id"]}
    assert count_rows(clean_db, "group_member", "group_id = :g", g=group["id"]) == 1

    with clean_db.connect() as connection:
        row = connection.execute(
            text("SELECT user_name, deleted_at FROM scim_user WHERE id = :i"), {"i": user["id"]}
        ).one()
    assert row.user_name == "leaver@example.com"
    assert row.deleted_at is not None
    statuses = {u["id"]: u["status"] for u in admin.get(f"/tenants/{tenant.tenant_id}/users").json()}
    assert statuses[user["id"]] == "deleted"


def test_deleted_user_name_can_be_reused(tenant, clean_db):
    """Given a deleted User
    When the IdP creates a new User with the same userName in another case
    Then it gets 201 with a new id, and a filter finds only the new User."""
    old = create_user(tenant.client, "Rehire@example.com")
    assert tenant.client.delete(f"/Users/{old['id']}").status_code == 204
    new = create_user(tenant.client, "rehire@EXAMPLE.com")
    assert new["id"] != old["id"]
    found = tenant.client.get("/Users", params={"filter": 'userName eq "REHIRE@example.com"'}).json()
    assert [r["id"] for r in found["Resources"]] == [new["id"]]
    assert count_rows(clean_db, "scim_user", "tenant_id = :t", t=tenant.tenant_id) == 2


def test_deleted_user_cannot_be_added_to_a_group(tenant, clean_db):
    """Given a deleted User
    When the IdP adds its id to a group (RFC 7643 §4.2: members are resources of this provider)
    Then it gets 400 invalidValue and the group stays empty."""
    user = create_user(tenant.client, "ghost@example.com")
    group = create_group(tenant.client, "Empty")
    assert tenant.client.delete(f"/Users/{user['id']}").status_code == 204
    response = tenant.client.patch(
        f"/Groups/{group['id']}", json=patch_body({"op": "add", "path": "members", "value": [{"value": user["id"]}]})
    )
    assert_scim_error(response, 400, "invalidValue")
    assert member_ids(tenant.client, group["id"]) == set()


# ------------------------------------------------------------------ list and paging


def test_list_users_pages_with_start_index_and_count(tenant, clean_db):
    """Given 7 Users
    When the IdP pages through them with count=3 (RFC 7644 §3.4.2.4)
    Then pages start at 1, 4 and 7 with 3, 3 and 1 items, each echoes its startIndex,
    totalResults is 7 on every page, and together they hold every User once."""
    ids = [create_user(tenant.client, f"page{i}@example.com")["id"] for i in range(7)]
    seen: list[str] = []
    for start, expected_items in ((1, 3), (4, 3), (7, 1)):
        response = tenant.client.get("/Users", params={"startIndex": start, "count": 3})
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["schemas"] == [LIST_RESPONSE]
        assert page["totalResults"] == 7
        assert page["startIndex"] == start
        assert page["itemsPerPage"] == expected_items
        assert len(page["Resources"]) == expected_items
        seen.extend(r["id"] for r in page["Resources"])
    assert sorted(seen) == sorted(ids)
    assert len(set(seen)) == 7


def test_list_users_past_the_end_and_count_zero(tenant, clean_db):
    """Given 2 Users
    When the IdP asks past the last one, or with count=0, or with startIndex=0 (RFC 7644 §3.4.2.4)
    Then past the end is an empty page with the real totalResults; count=0 gives
    only totalResults; startIndex below 1 is read as 1."""
    create_user(tenant.client, "a@example.com")
    create_user(tenant.client, "b@example.com")
    past = tenant.client.get("/Users", params={"startIndex": 10, "count": 5}).json()
    assert (past["totalResults"], past["startIndex"], past["itemsPerPage"], past["Resources"]) == (2, 10, 0, [])
    zero = tenant.client.get("/Users", params={"count": 0}).json()
    assert (zero["totalResults"], zero["itemsPerPage"], zero["Resources"]) == (2, 0, [])
    low = tenant.client.get("/Users", params={"startIndex": 0}).json()
    assert (low["startIndex"], low["itemsPerPage"]) == (1, 2)


def test_list_with_a_huge_start_index_is_an_empty_page(tenant, clean_db):
    """Given a User
    When the IdP asks for startIndex beyond any 64-bit integer
    Then it gets a well-formed empty page, not a 500."""
    create_user(tenant.client, "a@example.com")
    response = tenant.client.get("/Users", params={"startIndex": "99999999999999999999", "count": 10})
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["totalResults"] == 1
    assert page["Resources"] == []


def test_search_by_post(tenant, clean_db):
    """Given Users
    When the IdP searches with POST /Users/.search (RFC 7644 §3.4.3)
    Then the filter and paging apply as on GET."""
    create_user(tenant.client, "one@example.com")
    two = create_user(tenant.client, "two@example.com")
    response = tenant.client.post(
        "/Users/.search",
        json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
            "filter": 'userName eq "TWO@example.com"',
            "startIndex": 1,
            "count": 10,
        },
    )
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()["Resources"]] == [two["id"]]


# ------------------------------------------------------------------ filters


def _filter_ids(tenant, expression: str) -> list[str]:
    response = tenant.client.get("/Users", params={"filter": expression})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["totalResults"] == len(body["Resources"])
    return [r["id"] for r in body["Resources"]]


@pytest.mark.parametrize(
    "stored, asked",
    [
        ("Ada@Example.com", "ada@example.COM"),
        ("ÄNNE@x.com", "änne@x.com"),
        ("änne@x.com", "ÄNNE@X.COM"),
        ("straße@x.com", "STRASSE@x.com"),
        ("STRASSE@x.com", "straße@x.com"),
        ("ΣΊΣΥΦΟΣ@x.gr", "σίσυφος@x.gr"),
    ],
)
def test_user_name_filter_and_uniqueness_fold_case_the_same_way(tenant, clean_db, stored, asked):
    """Given a User stored as `stored`
    When the IdP filters `userName eq asked` (RFC 7643 §4.1.1: userName caseExact false)
    and then POSTs a User named `asked`
    Then the filter finds the stored User, and the POST is refused with 409 uniqueness:
    the filter and the uniqueness index use one case-folding (Unicode casefold, ß ≡ ss)."""
    user = create_user(tenant.client, stored)
    assert _filter_ids(tenant, f'userName eq "{asked}"') == [user["id"]]
    assert_scim_error(tenant.client.post("/Users", json=user_body(asked)), 409, "uniqueness")
    assert count_rows(clean_db, "scim_user") == 1


def test_user_name_filter_does_not_match_other_names(tenant, clean_db):
    """Given Users "anne@x.com" and "änne@x.com" (different letters, not different case)
    When the IdP filters on each
    Then each filter finds exactly its own User and both could be created (201)."""
    plain = create_user(tenant.client, "anne@x.com")
    umlaut = create_user(tenant.client, "änne@x.com")
    assert _filter_ids(tenant, 'userName eq "ANNE@x.com"') == [plain["id"]]
    assert _filter_ids(tenant, 'userName eq "Änne@x.com"') == [umlaut["id"]]


def test_filter_on_external_id_is_case_exact(tenant, clean_db):
    """Given Users with externalIds
    When the IdP filters `externalId eq` (RFC 7643 §3.1: externalId caseExact true)
    Then the exact value finds the User and another case finds nothing."""
    user = create_user(tenant.client, "ext1@example.com", externalId="AbC-123")
    create_user(tenant.client, "ext2@example.com", externalId="other")
    assert _filter_ids(tenant, 'externalId eq "AbC-123"') == [user["id"]]
    assert _filter_ids(tenant, 'externalId eq "abc-123"') == []


def test_filter_on_id_and_display_name(tenant, clean_db):
    """Given Users
    When the IdP filters `id eq` and `displayName eq` (RFC 7644 §3.4.2.2)
    Then each finds the right User; displayName compares case-insensitively (caseExact false)."""
    first = create_user(tenant.client, "first@example.com", displayName="First Person")
    create_user(tenant.client, "second@example.com", displayName="Second Person")
    assert _filter_ids(tenant, f'id eq "{first["id"]}"') == [first["id"]]
    assert _filter_ids(tenant, 'displayName eq "FIRST person"') == [first["id"]]
    assert _filter_ids(tenant, f'id eq "{uuid.uuid4().hex}"') == []


def test_filter_combined_with_and_and_or(tenant, clean_db):
    """Given active and inactive Users
    When the IdP combines conditions with and/or (RFC 7644 §3.4.2.2)
    Then exactly the matching Users come back."""
    a = create_user(tenant.client, "a@example.com", active=True)
    b = create_user(tenant.client, "b@example.com", active=False)
    create_user(tenant.client, "c@example.com", active=True)
    assert _filter_ids(tenant, 'userName eq "b@example.com" and active eq false') == [b["id"]]
    assert _filter_ids(tenant, 'userName eq "b@example.com" and active eq true') == []
    assert sorted(_filter_ids(tenant, 'userName eq "a@example.com" or userName eq "B@example.com"')) == sorted(
        [a["id"], b["id"]]
    )


@pytest.mark.parametrize(
    "expression",
    [
        'foo eq "x"',  # unknown attribute
        'name.bogus eq "x"',  # unknown sub-attribute
        'urn:example:unknown:2.0:User:x eq "y"',  # unknown schema
        'meta.bogus eq "x"',  # not a meta sub-attribute (RFC 7643 §3.1)
        'userName zz "x"',  # unknown operator
        "userName eq",  # no value
        "userName eq bob",  # unquoted string
        '(userName eq "a"',  # unbalanced parenthesis
        'userName eq "a")',
        'userName eq "a" and',  # dangling logical operator
        'emails[type eq "work"',  # unbalanced bracket
        'userName eq "unterminated',
        "   ",
        'not userName eq "a"',  # not without parentheses
        'meta.created gt "not a date"',
        'meta.lastModified eq 5',
        'active gt true',  # RFC 7644 §3.4.2.2: gt on a boolean is invalidFilter
        'active eq "yes"',
        'userName gt 5',
        'userName eq "a\\u0000b"',
    ],
)
def test_unsupported_or_malformed_user_filters_are_400_invalid_filter(tenant, clean_db, expression):
    """Given a User
    When the IdP sends a filter with an unknown attribute, a bad operator, a type that
    cannot compare, or bad syntax
    Then it gets 400 invalidFilter (RFC 7644 §3.4.2.2, §3.12), never a 500 and never
    a silently ignored filter."""
    create_user(tenant.client, "someone@example.com")
    response = tenant.client.get("/Users", params={"filter": expression})
    assert_scim_error(response, 400, "invalidFilter")


def test_filter_on_meta_last_modified(tenant, clean_db):
    """Given a User
    When the IdP filters on meta.lastModified with ISO 8601 date-times (RFC 7644 §3.4.2.2, Okta's incremental reads)
    Then a date before the write finds the User and a date far ahead does not."""
    user = create_user(tenant.client, "dated@example.com")
    assert _filter_ids(tenant, 'meta.lastModified gt "2000-01-01T00:00:00Z"') == [user["id"]]
    assert _filter_ids(tenant, 'meta.lastModified gt "2999-01-01T00:00:00Z"') == []
    assert _filter_ids(tenant, 'meta.created ge "2000-01-01T00:00:00+00:00"') == [user["id"]]


def test_substring_filters_treat_wildcards_literally(tenant, clean_db):
    """Given Users "50%off_deal@x.com" and "plain@x.com"
    When the IdP filters with co/sw/ew on "%" and "_" (RFC 7644 §3.4.2.2: substring match)
    Then "%" and "_" match only themselves, not any text; matching ignores case."""
    deal = create_user(tenant.client, "50%off_deal@x.com")
    plain = create_user(tenant.client, "plain@x.com")
    assert _filter_ids(tenant, 'userName co "%"') == [deal["id"]]
    assert _filter_ids(tenant, 'userName co "_"') == [deal["id"]]
    assert _filter_ids(tenant, 'userName sw "50%OFF"') == [deal["id"]]
    assert _filter_ids(tenant, 'userName ew "%x.com"') == []
    assert sorted(_filter_ids(tenant, 'userName ew "@X.COM"')) == sorted([deal["id"], plain["id"]])


def test_filter_on_emails_value(tenant, clean_db):
    """Given Users with emails
    When the IdP filters `emails[type eq "work" and value eq …]` (RFC 7644 §3.4.2.2 valuePath)
    Then the right User is found (case-insensitively: emails.value is caseExact false)."""
    user = create_user(tenant.client, "mail1@example.com", emails=[{"value": "Work1@Corp.example", "type": "work"}])
    create_user(tenant.client, "mail2@example.com", emails=[{"value": "work2@corp.example", "type": "work"}])
    assert _filter_ids(tenant, 'emails[type eq "work" and value eq "work1@corp.example"]') == [user["id"]]
    assert _filter_ids(tenant, 'emails.value eq "WORK1@corp.example"') == [user["id"]]


def test_users_of_another_tenant_are_invisible(tenant, admin, clean_db):
    """Given two tenants, each with a User of the same userName
    When each tenant lists, filters or reads by id
    Then it sees only its own User; the other's id is 404 (tenants are isolated)."""
    from tests.conftest import connect_tenant

    other = connect_tenant(admin, "Other Corp")
    try:
        mine = create_user(tenant.client, "same@example.com")
        theirs = create_user(other.client, "same@example.com")
        assert _filter_ids(tenant, 'userName eq "same@example.com"') == [mine["id"]]
        assert [r["id"] for r in other.client.get("/Users").json()["Resources"]] == [theirs["id"]]
        assert_scim_error(tenant.client.get(f"/Users/{theirs['id']}"), 404)
        assert_scim_error(tenant.client.delete(f"/Users/{theirs['id']}"), 404)
        assert other.client.get(f"/Users/{theirs['id']}").status_code == 200
    finally:
        other.client.close()


def test_attributes_projection(tenant, clean_db):
    """Given a User with several attributes
    When the IdP reads with attributes=userName or excludedAttributes=emails (RFC 7644 §3.9)
    Then only the asked attributes (plus id and schemas) or all but the excluded ones come back."""
    user = create_user(tenant.client, "proj@example.com", title="T", emails=[{"value": "p@example.com"}])
    only = tenant.client.get(f"/Users/{user['id']}", params={"attributes": "userName"}).json()
    assert set(only) == {"id", "schemas", "userName"}
    without = tenant.client.get(f"/Users/{user['id']}", params={"excludedAttributes": "emails"}).json()
    assert "emails" not in without and without["title"] == "T"
