"""Bad input and bad credentials: the SCIM error body (RFC 7644 §3.12), and no change in the database."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.api.helpers import (
    GROUP_SCHEMA,
    PATCH_OP,
    USER_SCHEMA,
    assert_scim_error,
    create_group,
    create_user,
    group_body,
    patch_body,
    plain_client,
    scim_client,
    snapshot,
    user_body,
)
from tests.conftest import connect_tenant


@pytest.fixture
def seeded(tenant, clean_db):
    """A tenant with a User in a Group, and the directory rows before the test's request."""
    user = create_user(tenant.client, "seed@example.com")
    group = create_group(tenant.client, "Seeded", [user["id"]])
    return {"user": user["id"], "group": group["id"], "before": snapshot(clean_db)}


def raw(client: httpx.Client, method: str, path: str, content: bytes) -> httpx.Response:
    return client.request(method, path, content=content, headers={"Content-Type": "application/scim+json"})


# ------------------------------------------------------------------ malformed bodies


MALFORMED = [
    ("POST", "/Users", b'{"schemas": ['),
    ("POST", "/Users", b"not json"),
    ("POST", "/Users", b""),
    ("POST", "/Users", b'{"userName": "a",}'),
    ("POST", "/Users", b'{"userName": "a"} {"userName": "b"}'),
    ("PUT", "/Users/{user}", b'{"schemas": ['),
    ("PATCH", "/Users/{user}", b"{'Operations': []}"),
    ("POST", "/Groups", b'{"displayName": "x"'),
    ("PUT", "/Groups/{group}", b""),
    ("PATCH", "/Groups/{group}", b'{"Operations": [}'),
    ("POST", "/Users/.search", b"filter=x"),
]


@pytest.mark.parametrize("method, path, content", MALFORMED)
def test_malformed_json_is_400_invalid_syntax(tenant, clean_db, seeded, method, path, content):
    """Given a tenant with a User and a Group
    When the IdP sends a body that is not JSON (or is empty)
    Then it gets 400 invalidSyntax (RFC 7644 §3.12) and no row changed."""
    response = raw(tenant.client, method, path.format(**seeded), content)
    assert_scim_error(response, 400, "invalidSyntax")
    assert snapshot(clean_db) == seeded["before"]


@pytest.mark.parametrize(
    "body",
    [
        {"userName": "noschemas@example.com"},
        {"schemas": [GROUP_SCHEMA], "userName": "wrong@example.com"},
        {"schemas": USER_SCHEMA, "userName": "string@example.com"},
        {"schemas": [], "userName": "empty@example.com"},
        {"schemas": [PATCH_OP], "userName": "patchop@example.com"},
    ],
    ids=["absent", "group-schema", "not-a-list", "empty", "patchop"],
)
def test_user_with_wrong_schemas_is_400(tenant, clean_db, seeded, body):
    """Given a tenant
    When the IdP POSTs a User whose `schemas` does not hold the User schema (RFC 7643 §3)
    Then it gets 400 invalidSyntax and no User is created."""
    assert_scim_error(tenant.client.post("/Users", json=body), 400, "invalidSyntax")
    assert snapshot(clean_db) == seeded["before"]


def test_group_with_user_schema_is_400(tenant, clean_db, seeded):
    """Given a tenant
    When the IdP POSTs a Group declaring the User schema
    Then it gets 400 invalidSyntax and no Group is created."""
    body = {"schemas": [USER_SCHEMA], "displayName": "Wrong"}
    assert_scim_error(tenant.client.post("/Groups", json=body), 400, "invalidSyntax")
    assert snapshot(clean_db) == seeded["before"]


def test_patch_with_wrong_schemas_is_400(tenant, clean_db, seeded):
    """Given a User
    When the IdP PATCHes with a body whose schemas is not PatchOp (RFC 7644 §3.5.2)
    Then it gets 400 invalidSyntax and the User is unchanged."""
    body = {"schemas": [USER_SCHEMA], "Operations": [{"op": "replace", "path": "title", "value": "x"}]}
    assert_scim_error(tenant.client.patch(f"/Users/{seeded['user']}", json=body), 400, "invalidSyntax")
    assert snapshot(clean_db) == seeded["before"]


@pytest.mark.parametrize(
    "body",
    [
        {"schemas": [USER_SCHEMA]},
        {"schemas": [USER_SCHEMA], "userName": ""},
        {"schemas": [USER_SCHEMA], "userName": "   "},
        {"schemas": [USER_SCHEMA], "userName": None},
        {"schemas": [USER_SCHEMA], "userName": ["a@example.com"]},
    ],
    ids=["missing", "empty", "blank", "null", "list"],
)
def test_missing_or_invalid_user_name_is_400_invalid_value(tenant, clean_db, seeded, body):
    """Given a tenant
    When the IdP POSTs a User without a usable userName (RFC 7643 §4.1.1: required string)
    Then it gets 400 invalidValue and no User is created."""
    assert_scim_error(tenant.client.post("/Users", json=body), 400, "invalidValue")
    assert snapshot(clean_db) == seeded["before"]


def test_missing_display_name_on_group_is_400(tenant, clean_db, seeded):
    """Given a tenant
    When the IdP POSTs a Group without displayName (RFC 7643 §4.2: required)
    Then it gets 400 invalidValue and nothing is created."""
    assert_scim_error(tenant.client.post("/Groups", json={"schemas": [GROUP_SCHEMA]}), 400, "invalidValue")
    assert snapshot(clean_db) == seeded["before"]


# ------------------------------------------------------------------ uniqueness


@pytest.mark.parametrize("name", ["seed@example.com", "SEED@EXAMPLE.COM", "Seed@Example.Com", "ſeed@example.com"])
def test_duplicate_user_name_in_any_case_is_409(tenant, clean_db, seeded, name):
    """Given a User "seed@example.com"
    When the IdP POSTs another with the same userName in any case (RFC 7643 §4.1.1,
    caseExact false; "ſ" (long s) case-folds to "s")
    Then it gets 409 uniqueness (RFC 7644 §3.3) and no row changed."""
    assert_scim_error(tenant.client.post("/Users", json=user_body(name)), 409, "uniqueness")
    assert snapshot(clean_db) == seeded["before"]


def test_renaming_onto_a_taken_user_name_is_409(tenant, clean_db, seeded):
    """Given Users "seed@example.com" and "other@example.com"
    When the IdP renames the second to "SEED@example.com" by PUT or by PATCH
    Then both answer 409 uniqueness and the second User keeps its name."""
    other = create_user(tenant.client, "other@example.com")
    before = snapshot(clean_db)
    assert_scim_error(tenant.client.put(f"/Users/{other['id']}", json=user_body("SEED@example.com")), 409, "uniqueness")
    response = tenant.client.patch(
        f"/Users/{other['id']}", json=patch_body({"op": "replace", "path": "userName", "value": "Seed@Example.com"})
    )
    assert_scim_error(response, 409, "uniqueness")
    assert snapshot(clean_db) == before
    assert tenant.client.get(f"/Users/{other['id']}").json()["userName"] == "other@example.com"


# ------------------------------------------------------------------ unknown ids


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/Users/{id}", None),
        ("PUT", "/Users/{id}", user_body("ghost@example.com")),
        ("PATCH", "/Users/{id}", patch_body({"op": "replace", "path": "title", "value": "x"})),
        ("DELETE", "/Users/{id}", None),
        ("GET", "/Groups/{id}", None),
        ("PUT", "/Groups/{id}", group_body("Ghost")),
        ("PATCH", "/Groups/{id}", patch_body({"op": "replace", "path": "displayName", "value": "x"})),
        ("DELETE", "/Groups/{id}", None),
    ],
)
def test_unknown_id_is_404(tenant, clean_db, seeded, method, path, body):
    """Given a tenant
    When the IdP addresses a User or Group id that does not exist (RFC 7644 §3.12)
    Then it gets 404 with the SCIM error body (no scimType) and no row changed."""
    response = tenant.client.request(method, path.format(id=uuid.uuid4().hex), json=body)
    assert_scim_error(response, 404)
    assert snapshot(clean_db) == seeded["before"]


@pytest.mark.parametrize(
    "make_request",
    [
        lambda c, s: c.post("/Groups", json=group_body("New", [s["user"], "does-not-exist"])),
        lambda c, s: c.put(f"/Groups/{s['group']}", json=group_body("Seeded", [s["user"], "does-not-exist"])),
        lambda c, s: c.patch(
            f"/Groups/{s['group']}",
            json=patch_body({"op": "add", "path": "members", "value": [{"value": "does-not-exist"}]}),
        ),
        lambda c, s: c.patch(
            f"/Groups/{s['group']}",
            json=patch_body({"op": "replace", "path": "members", "value": [{"value": "does-not-exist"}]}),
        ),
    ],
    ids=["post", "put", "patch-add", "patch-replace"],
)
def test_unknown_member_id_is_400_invalid_value(tenant, clean_db, seeded, make_request):
    """Given a Group with one member
    When the IdP names a member id that is no User or Group of this tenant (RFC 7643 §4.2)
    Then it gets 400 invalidValue and no row changed (no partial membership, no event)."""
    assert_scim_error(make_request(tenant.client, seeded), 400, "invalidValue")
    assert snapshot(clean_db) == seeded["before"]


# ------------------------------------------------------------------ authentication


def _scim_requests(seeded: dict[str, Any]) -> list[tuple[str, str, Any]]:
    return [
        ("GET", "/Users", None),
        ("GET", f"/Users/{seeded['user']}", None),
        ("POST", "/Users", user_body("intruder@example.com")),
        ("PATCH", f"/Groups/{seeded['group']}", patch_body({"op": "replace", "path": "members", "value": []})),
        ("DELETE", f"/Users/{seeded['user']}", None),
        ("GET", "/ServiceProviderConfig", None),
    ]


def _assert_all_401(url: str, headers: dict[str, str], seeded: dict[str, Any], engine) -> None:
    with plain_client(url, headers) as client:
        for method, path, body in _scim_requests(seeded):
            response = client.request(method, path, json=body)
            assert_scim_error(response, 401)
            assert response.headers["www-authenticate"].lower().startswith("bearer")
    assert snapshot(engine) == seeded["before"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "test-admin-token"},
        {"Authorization": "Bearer test-admin-token"},
    ],
    ids=["none", "empty-bearer", "wrong", "basic", "no-scheme", "admin-token"],
)
def test_missing_or_wrong_token_is_401(tenant, clean_db, seeded, headers):
    """Given a tenant with a User and a Group
    When a client calls SCIM without the tenant's bearer token (RFC 7644 §2, RFC 6750 §3)
    Then every endpoint answers 401 with WWW-Authenticate: Bearer, and no row changed."""
    _assert_all_401(tenant.tenant_url, headers, seeded, clean_db)


def test_another_tenants_token_is_401(tenant, admin, clean_db, seeded):
    """Given two tenants
    When tenant B's valid token is used on tenant A's URL
    Then A answers 401 (CONTRACT.md) and nothing of A changed; B's token still works on B."""
    other = connect_tenant(admin, "Other")
    try:
        before = snapshot(clean_db)
        _assert_all_401(tenant.tenant_url, {"Authorization": f"Bearer {other.token}"}, {**seeded, "before": before}, clean_db)
        assert other.client.get("/Users").status_code == 200
    finally:
        other.client.close()


def test_revoked_token_after_disconnect_is_401(tenant, admin, clean_db, seeded):
    """Given a connected tenant
    When the admin disconnects SCIM (DELETE …/scim)
    Then the old token answers 401 everywhere and no row changed."""
    assert admin.delete(f"/tenants/{tenant.tenant_id}/scim").status_code == 204
    _assert_all_401(tenant.tenant_url, {"Authorization": f"Bearer {tenant.token}"}, seeded, clean_db)


def test_revoked_token_after_rotation_is_401(tenant, admin, clean_db, seeded):
    """Given a connected tenant
    When the admin rotates the token (POST …/scim/token)
    Then the old token answers 401 and the new one 200."""
    rotated = admin.post(f"/tenants/{tenant.tenant_id}/scim/token")
    assert rotated.status_code == 200, rotated.text
    _assert_all_401(tenant.tenant_url, {"Authorization": f"Bearer {tenant.token}"}, seeded, clean_db)
    with scim_client(tenant.tenant_url, rotated.json()["token"]) as client:
        assert client.get(f"/Users/{seeded['user']}").status_code == 200


def test_unknown_tenant_url_is_401(tenant, clean_db, live_server):
    """Given a valid token
    When it is used on a Tenant URL that does not exist
    Then the answer is 401 (the token does not belong there), never a 500."""
    with scim_client(f"{live_server.url}/scim/v2/{uuid.uuid4().hex}", tenant.token) as client:
        assert_scim_error(client.get("/Users"), 401)


# ------------------------------------------------------------------ other RFC 7644 errors


def test_stale_if_match_is_412(tenant, clean_db, seeded):
    """Given a User at some version
    When the IdP PUTs with an If-Match of another version (RFC 7644 §3.14)
    Then it gets 412 and the User is unchanged; the current ETag works."""
    etag = tenant.client.get(f"/Users/{seeded['user']}").headers["etag"]
    stale = tenant.client.put(
        f"/Users/{seeded['user']}", json=user_body("seed@example.com", title="x"), headers={"If-Match": 'W/"999"'}
    )
    assert_scim_error(stale, 412)
    assert snapshot(clean_db) == seeded["before"]
    fresh = tenant.client.put(
        f"/Users/{seeded['user']}", json=user_body("seed@example.com", title="x"), headers={"If-Match": etag}
    )
    assert fresh.status_code == 200, fresh.text


def test_too_large_body_is_413(tenant, clean_db, seeded, live_server):
    """Given the configured body limit
    When the IdP POSTs a larger body (RFC 7644 §3.12: 413)
    Then it gets 413 and nothing is stored."""
    limit = live_server.settings.max_body_bytes
    body = user_body("big@example.com", title="x" * (limit + 10))
    assert_scim_error(tenant.client.post("/Users", json=body), 413)
    assert snapshot(clean_db) == seeded["before"]


def test_unknown_endpoint_and_method(tenant, clean_db):
    """Given a tenant
    When the IdP calls a path that does not exist, or a method an endpoint does not have
    Then it gets 404 or 405 with the SCIM error body."""
    assert_scim_error(tenant.client.get("/Nope"), 404)
    assert_scim_error(tenant.client.delete("/Users"), 405)


# ------------------------------------------------------------------ no 500, ever

DEEP: dict[str, Any] = {}
_cursor = DEEP
for _ in range(300):
    _cursor["x"] = {}
    _cursor = _cursor["x"]

ODD_USER_BODIES = [
    ("array", [user_body("a@example.com")]),
    ("number", 42),
    ("null", None),
    ("string", "userName"),
    ("userName-object", {"schemas": [USER_SCHEMA], "userName": {"value": "a"}}),
    ("userName-513", user_body("a" * 513)),
    ("userName-folds-past-512", user_body("ß" * 300)),
    ("userName-ligatures-past-512", user_body("ﬃ" * 200)),
    ("userName-nul", user_body("nul\u0000@example.com")),
    ("title-nul", user_body("t@example.com", title="a\u0000b")),
    ("displayName-513", user_body("d@example.com", displayName="d" * 513)),
    ("externalId-number", user_body("e@example.com", externalId=7)),
    ("active-maybe", user_body("m@example.com", active="maybe")),
    ("active-list", user_body("m@example.com", active=[True])),
    ("name-string", user_body("n@example.com", name="Ada Lovelace")),
    ("name-given-object", user_body("n@example.com", name={"givenName": {"a": 1}})),
    ("emails-string", user_body("e@example.com", emails="e@example.com")),
    ("emails-numbers", user_body("e@example.com", emails=[1, 2])),
    ("emails-value-object", user_body("e@example.com", emails=[{"value": {"x": 1}}])),
    ("emails-primary-string", user_body("e@example.com", emails=[{"value": "a@b.c", "primary": "maybe"}])),
    ("enterprise-string", user_body("x@example.com", **{"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": "x"})),
    ("enterprise-manager-number", user_body("x@example.com", **{"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"manager": 5}})),
    ("deeply-nested-garbage", user_body("deep@example.com", junk=DEEP)),
    ("schemas-numbers", {"schemas": [1, 2], "userName": "s@example.com"}),
]


@pytest.mark.parametrize("body", [b for _, b in ODD_USER_BODIES], ids=[i for i, _ in ODD_USER_BODIES])
def test_odd_user_bodies_are_4xx_never_500(tenant, clean_db, seeded, body):
    """Given a tenant
    When the IdP POSTs an odd but plausible User body (wrong JSON types, too long values,
    U+0000, garbage nested past what can be stored)
    Then it gets a 4xx with the SCIM error body (STYLE.md: client mistakes are never 500)
    and nothing is stored."""
    response = tenant.client.post("/Users", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert_scim_error(response, response.status_code, response.json().get("scimType"))
    assert snapshot(clean_db) == seeded["before"]


ODD_GROUP_BODIES = [
    ("array", [group_body("G")]),
    ("null", None),
    ("number", 3.5),
    ("displayName-object", {"schemas": [GROUP_SCHEMA], "displayName": {"a": 1}}),
    ("displayName-513", group_body("g" * 513)),
    ("displayName-folds-past-512", group_body("ß" * 257)),
    ("displayName-nul", group_body("G\u0000")),
    ("externalId-object", group_body("G", externalId={"a": 1})),
    ("members-string", {"schemas": [GROUP_SCHEMA], "displayName": "G", "members": "everyone"}),
    ("members-nested-lists", {"schemas": [GROUP_SCHEMA], "displayName": "G", "members": [[{"value": "x"}]]}),
    ("member-value-number", {"schemas": [GROUP_SCHEMA], "displayName": "G", "members": [{"value": 5}]}),
    ("member-empty", {"schemas": [GROUP_SCHEMA], "displayName": "G", "members": [{}]}),
    ("deeply-nested-garbage", group_body("G", junk=DEEP)),
]


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("body", [b for _, b in ODD_GROUP_BODIES], ids=[i for i, _ in ODD_GROUP_BODIES])
def test_odd_group_bodies_are_4xx_never_500(tenant, clean_db, seeded, method, body):
    """Given a Group
    When the IdP POSTs or PUTs an odd Group body (RFC 7643 §4.2)
    Then it gets a 4xx with the SCIM error body and nothing changed."""
    path = "/Groups" if method == "POST" else f"/Groups/{seeded['group']}"
    response = tenant.client.request(method, path, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert_scim_error(response, response.status_code, response.json().get("scimType"))
    assert snapshot(clean_db) == seeded["before"]


ODD_REPLACEMENTS = ["array", "null", "userName-513", "userName-folds-past-512", "userName-nul", "emails-numbers", "deeply-nested-garbage"]


@pytest.mark.parametrize("body", [dict(ODD_USER_BODIES)[i] for i in ODD_REPLACEMENTS], ids=ODD_REPLACEMENTS)
def test_odd_user_replacements_are_4xx_never_500(tenant, clean_db, seeded, body):
    """Given a User
    When the IdP PUTs an odd User body (RFC 7644 §3.5.1)
    Then it gets a 4xx with the SCIM error body and the User is unchanged."""
    response = tenant.client.put(f"/Users/{seeded['user']}", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert_scim_error(response, response.status_code, response.json().get("scimType"))
    assert snapshot(clean_db) == seeded["before"]


ODD_PATCHES = [
    ("operations-object", {"schemas": [PATCH_OP], "Operations": {"op": "add"}}),
    ("operations-string", {"schemas": [PATCH_OP], "Operations": "add"}),
    ("operations-missing", {"schemas": [PATCH_OP]}),
    ("operation-number", patch_body(5)),
    ("op-missing", patch_body({"path": "title", "value": "x"})),
    ("op-unknown", patch_body({"op": "move", "path": "title", "value": "x"})),
    ("op-number", patch_body({"op": 1, "path": "title", "value": "x"})),
    ("path-unknown", patch_body({"op": "replace", "path": "favouriteColour", "value": "x"})),
    ("path-unknown-sub", patch_body({"op": "replace", "path": "name.nickname", "value": "x"})),
    ("path-unknown-schema", patch_body({"op": "replace", "path": "urn:example:x:1.0:User:a", "value": "x"})),
    ("path-number", patch_body({"op": "replace", "path": 7, "value": "x"})),
    ("path-unbalanced", patch_body({"op": "replace", "path": 'emails[type eq "work"', "value": "x"})),
    ("path-unbalanced-parens", patch_body({"op": "remove", "path": 'emails[(type eq "work"]'})),
    ("path-readonly-id", patch_body({"op": "replace", "path": "id", "value": "x"})),
    ("path-readonly-meta", patch_body({"op": "replace", "path": "meta.created", "value": "x"})),
    ("path-readonly-groups", patch_body({"op": "add", "path": "groups", "value": [{"value": "g"}]})),
    ("remove-without-path", patch_body({"op": "remove"})),
    ("pathless-value-string", patch_body({"op": "replace", "value": "x"})),
    ("pathless-value-list", patch_body({"op": "add", "value": [1]})),
    ("userName-null", patch_body({"op": "replace", "path": "userName", "value": None})),
    ("userName-too-long", patch_body({"op": "replace", "path": "userName", "value": "u" * 600})),
    ("userName-nul", patch_body({"op": "replace", "path": "userName", "value": "a\u0000"})),
    ("active-maybe", patch_body({"op": "replace", "path": "active", "value": "maybe"})),
    ("emails-filter-no-match-remove", patch_body({"op": "replace", "path": 'emails[type eq "work" or type eq "home"].value', "value": "x"})),
    ("nested-garbage", patch_body({"op": "add", "path": "name", "value": {"givenName": [[[]]]}})),
    ("deep-garbage", patch_body({"op": "add", "value": {"junk": DEEP}})),
]


@pytest.mark.parametrize("body", [b for _, b in ODD_PATCHES], ids=[i for i, _ in ODD_PATCHES])
def test_odd_user_patches_are_4xx_never_500(tenant, clean_db, seeded, body):
    """Given a User
    When the IdP sends an odd PATCH (Operations not a list, op missing, unknown or
    read-only paths, bad filters in paths, wrong value types — RFC 7644 §3.5.2)
    Then it gets a 4xx with the SCIM error body and the User is unchanged."""
    response = tenant.client.patch(f"/Users/{seeded['user']}", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert_scim_error(response, response.status_code, response.json().get("scimType"))
    assert snapshot(clean_db) == seeded["before"]


ODD_GROUP_PATCHES = [
    ("members-string", patch_body({"op": "add", "path": "members", "value": "id"})),
    ("members-numbers", patch_body({"op": "add", "path": "members", "value": [1, 2]})),
    ("member-value-null", patch_body({"op": "add", "path": "members", "value": [{"value": None}]})),
    ("member-value-number", patch_body({"op": "add", "path": "members", "value": [{"value": 5}]})),
    ("member-type-odd", patch_body({"op": "add", "path": "members", "value": [{"value": "x", "type": "Robot"}]})),
    ("member-nul", patch_body({"op": "add", "path": "members", "value": [{"value": "a\u0000"}]})),
    ("members-filter-ne", patch_body({"op": "remove", "path": 'members[value ne "x"]'})),
    ("members-filter-add", patch_body({"op": "add", "path": 'members[value eq "x"]', "value": [{"value": "x"}]})),
    ("members-filter-unbalanced", patch_body({"op": "remove", "path": 'members[value eq "x"'})),
    ("displayName-null", patch_body({"op": "replace", "path": "displayName", "value": None})),
    ("displayName-list", patch_body({"op": "replace", "path": "displayName", "value": ["a"]})),
    ("displayName-folds-past-512", patch_body({"op": "replace", "path": "displayName", "value": "ß" * 300})),
    ("path-userName", patch_body({"op": "replace", "path": "userName", "value": "x"})),
]


@pytest.mark.parametrize("body", [b for _, b in ODD_GROUP_PATCHES], ids=[i for i, _ in ODD_GROUP_PATCHES])
def test_odd_group_patches_are_4xx_never_500(tenant, clean_db, seeded, body):
    """Given a Group with a member
    When the IdP sends an odd member PATCH (RFC 7644 §3.5.2, RFC 7643 §4.2)
    Then it gets a 4xx with the SCIM error body and the Group is unchanged."""
    response = tenant.client.patch(f"/Groups/{seeded['group']}", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert_scim_error(response, response.status_code, response.json().get("scimType"))
    assert snapshot(clean_db) == seeded["before"]


ODD_QUERIES = [
    ("/Users", {"filter": "((((userName eq \"a\")"}),
    ("/Users", {"filter": "userName eq \"a\" and (active eq true"}),
    ("/Users", {"filter": "(" * 200 + 'userName eq "a"' + ")" * 200}),
    ("/Users", {"filter": 'userName eq "' + "x" * 5000 + '" or (userName eq "y"'}),
    ("/Users", {"count": "abc"}),
    ("/Users", {"startIndex": "one"}),
    ("/Users", {"count": "1.5"}),
    ("/Users", {"sortBy": "favouriteColour"}),
    ("/Users", {"sortOrder": "sideways"}),
    ("/Users", {"attributes": "urn:nope"}),
    ("/Groups", {"filter": "displayName eq \"a\" or"}),
    ("/Groups", {"filter": "members[value eq \"a\"]]"}),
    ("/Users/{user}", {"attributes": "urn:nope"}),
]


@pytest.mark.parametrize("path, params", [q for q in ODD_QUERIES], ids=[f"{p}?{'&'.join(q)}-{i}" for i, (p, q) in enumerate(ODD_QUERIES)])
def test_odd_queries_are_400_never_500(tenant, clean_db, seeded, path, params):
    """Given a tenant
    When the IdP lists with a malformed filter (unbalanced parentheses, too deep), a
    non-integer startIndex or count, or an unknown sort or attribute (RFC 7644 §3.4.2)
    Then it gets 400 with the SCIM error body."""
    response = tenant.client.get(path.format(**seeded), params=params)
    assert_scim_error(response, 400, response.json().get("scimType"))
    if "filter" in params:
        assert response.json()["scimType"] == "invalidFilter"


@pytest.mark.parametrize("path", ["/Users/a%00b", "/Groups/a%00b", "/Users/" + "x" * 3000])
def test_odd_ids_in_the_path_are_404(tenant, clean_db, seeded, path):
    """Given a tenant
    When the IdP addresses an id holding U+0000 or an absurdly long id
    Then it gets 404, not a database error."""
    assert_scim_error(tenant.client.get(path), 404)
    assert_scim_error(tenant.client.delete(path), 404)
    assert snapshot(clean_db) == seeded["before"]


SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
ODD_SEARCHES = [
    ("schemas-number", {"schemas": 5, "filter": 'userName eq "a"'}),
    ("schemas-null-items", {"schemas": [None]}),
    ("schemas-other", {"schemas": [USER_SCHEMA]}),
    ("filter-number", {"schemas": [SEARCH], "filter": 5}),
    ("filter-unbalanced", {"schemas": [SEARCH], "filter": '(displayName eq "a"'}),
    ("startIndex-list", {"schemas": [SEARCH], "startIndex": [1]}),
    ("count-object", {"schemas": [SEARCH], "count": {"n": 1}}),
    ("array", [{"schemas": [SEARCH]}]),
    ("null", None),
]


@pytest.mark.parametrize("endpoint", ["/Users/.search", "/Groups/.search"])
@pytest.mark.parametrize("body", [b for _, b in ODD_SEARCHES], ids=[i for i, _ in ODD_SEARCHES])
def test_odd_search_requests_are_400_never_500(tenant, clean_db, seeded, endpoint, body):
    """Given a tenant
    When the IdP POSTs an odd SearchRequest (RFC 7644 §3.4.3)
    Then it gets 400 with the SCIM error body."""
    response = tenant.client.post(endpoint, json=body)
    assert_scim_error(response, 400, response.json().get("scimType"))
