"""Bounded work per request (issue 8): every cap accepts its limit, refuses one past it with
a clear SCIM error, and the refused request changes nothing."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import orjson
import pytest
from starlette.testclient import TestClient

from api.app import Services, create_app
from models.settings import ScimLimits
from tests.api.helpers import (
    ENTERPRISE_SCHEMA,
    GROUP_SCHEMA,
    USER_SCHEMA,
    assert_scim_error,
    group_body,
    patch_body,
    snapshot,
    user_body,
)

# Small caps so that "at the limit" and "one past it" are cheap to build.
LIMITS = ScimLimits(
    max_patch_operations=3,
    max_values=3,
    max_members=3,
    max_attribute_names=3,
    max_filter_length=200,
    max_filter_terms=3,
    max_filter_candidates=3,
    max_document_bytes=2048,
)


@pytest.fixture
def capped(base_settings, engine, tenant) -> Iterator[TestClient]:
    """The app with LIMITS, in process, on the tenant the `tenant` fixture set up."""
    settings = dataclasses.replace(base_settings, scim_limits=LIMITS)
    services = Services.from_settings(settings)
    services.engine.dispose()
    services.engine = engine
    app = create_app(settings, services)
    with TestClient(app, base_url=tenant.tenant_url, headers={"Authorization": f"Bearer {tenant.token}"}) as client:
        yield client


def post(client: TestClient, path: str, body: Any) -> Any:
    return client.post(path, content=orjson.dumps(body), headers={"Content-Type": "application/scim+json"})


def send(client: TestClient, method: str, path: str, body: Any) -> Any:
    return client.request(method, path, content=orjson.dumps(body), headers={"Content-Type": "application/scim+json"})


def created(response: Any) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return response.json()


def refused_unchanged(engine, response: Any, before: dict, status: int, scim_type: str | None) -> dict[str, Any]:
    body = assert_scim_error(response, status, scim_type)
    assert snapshot(engine) == before
    return body


def emails(n: int, prefix: str = "a") -> list[dict[str, str]]:
    return [{"value": f"{prefix}{i}@example.com", "type": "work"} for i in range(n)]


# ------------------------------------------------------------------ PATCH operations


def test_patch_operations_at_the_cap_pass_and_one_more_is_refused(capped, engine):
    """Given SCIM_MAX_PATCH_OPERATIONS=3, a PATCH of 3 operations applies; one of 4 is a
    400 invalidValue naming the cap, and the user is unchanged."""
    user = created(post(capped, "/Users", user_body("ops@example.com")))
    ops = [{"op": "replace", "path": "title", "value": f"t{i}"} for i in range(4)]
    ok = send(capped, "PATCH", f"/Users/{user['id']}", patch_body(*ops[:3]))
    assert ok.status_code == 200, ok.text
    assert ok.json()["title"] == "t2"
    before = snapshot(engine)
    body = refused_unchanged(engine, send(capped, "PATCH", f"/Users/{user['id']}", patch_body(*ops)), before, 400,
                             "invalidValue")
    assert "3 operations" in body["detail"]


# ------------------------------------------------------------------ values per attribute


def test_values_of_a_multi_valued_attribute_at_the_cap_pass_one_more_is_refused(capped, engine):
    """Given SCIM_MAX_VALUES=3: a user with 3 emails is created; 4 emails on POST, on PUT or
    through a PATCH add are a 400 invalidValue, and nothing is stored."""
    user = created(post(capped, "/Users", user_body("values@example.com", emails=emails(3))))
    assert len(user["emails"]) == 3
    before = snapshot(engine)
    refused_unchanged(engine, post(capped, "/Users", user_body("four@example.com", emails=emails(4))), before, 400,
                      "invalidValue")
    refused_unchanged(engine, send(capped, "PUT", f"/Users/{user['id']}",
                                   user_body("values@example.com", emails=emails(4))), before, 400, "invalidValue")
    add_one = patch_body({"op": "add", "path": "emails", "value": [{"value": "new@example.com"}]})
    refused_unchanged(engine, send(capped, "PATCH", f"/Users/{user['id']}", add_one), before, 400, "invalidValue")


def test_the_values_cap_counts_extension_and_unknown_attributes_and_entra_role_text(capped, engine):
    """Lists the schema does not define, lists in the enterprise extension and Entra's roles sent as
    one JSON text are counted too."""
    before = snapshot(engine)
    bodies = [
        user_body("x1@example.com", customList=[1, 2, 3, 4]),
        user_body("x2@example.com", **{ENTERPRISE_SCHEMA: {"costCenters": ["a", "b", "c", "d"]}}),
        user_body("x3@example.com", roles=orjson.dumps([{"value": f"r{i}"} for i in range(4)]).decode()),
    ]
    for body in bodies:
        refused_unchanged(engine, post(capped, "/Users", body), before, 400, "invalidValue")
    created(post(capped, "/Users", user_body("x4@example.com", roles=orjson.dumps(
        [{"value": f"r{i}"} for i in range(3)]).decode())))


def test_read_only_lists_are_ignored_not_counted(capped):
    """`groups` is readOnly (RFC 7643 §4.1.2): a client may echo a long list back; it is ignored."""
    user = created(post(capped, "/Users", user_body("ro@example.com", groups=[{"value": str(i)} for i in range(9)])))
    assert "groups" not in user


# ------------------------------------------------------------------ members


def test_members_per_request_at_the_cap_pass_one_more_is_refused(capped, engine):
    """Given SCIM_MAX_MEMBERS=3: POST, PUT and PATCH of a group with 3 member references apply;
    4 are a 400 invalidValue, and neither the group nor its members change."""
    ids = [created(post(capped, "/Users", user_body(f"m{i}@example.com")))["id"] for i in range(4)]
    group = created(post(capped, "/Groups", group_body("Three", ids[:3])))
    assert len(group["members"]) == 3
    before = snapshot(engine)
    refused_unchanged(engine, post(capped, "/Groups", group_body("Four", ids)), before, 400, "invalidValue")
    refused_unchanged(engine, send(capped, "PUT", f"/Groups/{group['id']}", group_body("Three", ids)), before, 400,
                      "invalidValue")
    four = [{"value": i} for i in ids]
    for operations, scim_type in (
        ([{"op": "add", "path": "members", "value": four}], "invalidValue"),
        ([{"op": "replace", "path": "members", "value": four}], "invalidValue"),
        ([{"op": "remove", "path": "members", "value": four}], "invalidValue"),
        # Counted across operations: 2 + 2 references.
        ([{"op": "remove", "path": "members", "value": four[:2]},
          {"op": "add", "path": "members", "value": four[2:]}], "invalidValue"),
        ([{"op": "add", "value": {"members": four}}], "invalidValue"),
        # Four comparisons in the path's filter: past SCIM_MAX_FILTER_TERMS first.
        ([{"op": "remove", "path": "members[" + " or ".join(f'value eq "{i}"' for i in ids) + "]"}], "tooMany"),
    ):
        response = send(capped, "PATCH", f"/Groups/{group['id']}", patch_body(*operations))
        body = refused_unchanged(engine, response, before, 400, scim_type)
        assert "3" in body["detail"], body
    ok = send(capped, "PATCH", f"/Groups/{group['id']}", patch_body(
        {"op": "remove", "path": "members", "value": four[:1]}, {"op": "add", "path": "members", "value": four[3:]},
        {"op": "add", "path": "members", "value": four[1:2]},
    ))
    assert ok.status_code == 204, ok.text


# ------------------------------------------------------------------ attributes lists


@pytest.mark.parametrize("param", ["attributes", "excludedAttributes"])
def test_attribute_lists_at_the_cap_pass_one_more_is_refused(capped, param):
    """Given SCIM_MAX_ATTRIBUTE_NAMES=3: three names are answered; four are a 400 tooMany, on GET and
    in a SearchRequest (blank items between commas are not names)."""
    created(post(capped, "/Users", user_body("attrs@example.com")))
    assert capped.get("/Users", params={param: "userName,title,,nickName,"}).status_code == 200
    assert_scim_error(capped.get("/Users", params={param: "userName,title,nickName,locale"}), 400, "tooMany")
    search = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
              param: ["userName", "title", "nickName", "locale"]}
    assert_scim_error(post(capped, "/Users/.search", search), 400, "tooMany")
    search[param] = search[param][:3]
    assert post(capped, "/Users/.search", search).status_code == 200


# ------------------------------------------------------------------ filters


def test_filter_length_at_the_cap_passes_one_more_character_is_refused(capped):
    """Given SCIM_MAX_FILTER_LENGTH=200: a 200-character filter is answered, 201 is a 400 tooMany."""
    prefix = 'userName eq "'
    at_cap = prefix + "x" * (200 - len(prefix) - 1) + '"'
    assert len(at_cap) == 200
    assert capped.get("/Users", params={"filter": at_cap}).status_code == 200
    too_long = prefix + "x" * (200 - len(prefix)) + '"'
    body = assert_scim_error(capped.get("/Users", params={"filter": too_long}), 400, "tooMany")
    assert "200" in body["detail"]


def test_filter_terms_at_the_cap_pass_one_more_is_refused(capped, engine):
    """Given SCIM_MAX_FILTER_TERMS=3: three comparisons are answered, four are a 400 tooMany, in a
    filter and in a PATCH path's value filter (where nothing changes)."""
    three = " or ".join(f'userName eq "u{i}"' for i in range(3))
    assert capped.get("/Users", params={"filter": three}).status_code == 200
    assert_scim_error(capped.get("/Users", params={"filter": three + ' or title pr'}), 400, "tooMany")
    assert_scim_error(capped.get("/Groups", params={"filter": 'members[value eq "a" or value eq "b"] and '
                                                              'displayName pr and id pr'}), 400, "tooMany")
    user = created(post(capped, "/Users", user_body("path@example.com", emails=emails(1))))
    before = snapshot(engine)
    path = "emails[" + " or ".join(f'type eq "t{i}"' for i in range(4)) + "].value"
    refused_unchanged(engine, send(capped, "PATCH", f"/Users/{user['id']}",
                                   patch_body({"op": "remove", "path": path})), before, 400, "tooMany")


def test_a_filter_without_an_index_checks_at_most_the_candidate_cap(capped, engine):
    """Given SCIM_MAX_FILTER_CANDIDATES=3: a filter on `title` (no column) answers while the tenant has
    3 users; with 4 it is a 400 tooMany that names the indexed attributes, never a partial list;
    adding an indexed condition narrows the candidates and answers again."""
    for i in range(3):
        created(post(capped, "/Users", user_body(f"c{i}@example.com", title="Boss" if i == 0 else "Staff")))
    answer = capped.get("/Users", params={"filter": 'title eq "Boss"'})
    assert answer.status_code == 200 and answer.json()["totalResults"] == 1
    created(post(capped, "/Users", user_body("d3@example.com", title="Boss")))
    body = assert_scim_error(capped.get("/Users", params={"filter": 'title eq "Boss"'}), 400, "tooMany")
    assert "userName" in body["detail"] and "3" in body["detail"]
    narrowed = capped.get("/Users", params={"filter": 'userName sw "c" and title eq "Boss"'})
    assert narrowed.status_code == 200 and narrowed.json()["totalResults"] == 1


# ------------------------------------------------------------------ stored document size


def stored_size(body: dict[str, Any]) -> int:
    """The JSON size of what we store for a simple user body: its attributes and its schemas."""
    return len(orjson.dumps(body))


def test_stored_document_at_the_cap_passes_one_byte_more_is_413(capped, engine):
    """Given SCIM_MAX_DOCUMENT_BYTES=2048: a user whose document is exactly 2048 bytes is stored; one
    byte more is a 413 on POST, PUT and PATCH, and nothing changes."""
    body = user_body("doc@example.com", title="")
    body["title"] = "x" * (2048 - stored_size(body))
    assert stored_size(body) == 2048
    user = created(post(capped, "/Users", body))
    before = snapshot(engine)
    bigger = dict(body, title=body["title"] + "y")
    refused_unchanged(engine, post(capped, "/Users", dict(bigger, userName="doc2@example.com")), before, 413, None)
    refused_unchanged(engine, send(capped, "PUT", f"/Users/{user['id']}", bigger), before, 413, None)
    grow = patch_body({"op": "replace", "path": "title", "value": bigger["title"]})
    refused_unchanged(engine, send(capped, "PATCH", f"/Users/{user['id']}", grow), before, 413, None)


def test_group_members_do_not_count_towards_the_document_size(capped):
    """Members are rows, not part of the stored document: a group whose member list alone is past
    the cap (long `display` values, which are not stored) is accepted."""
    ids = [created(post(capped, "/Users", user_body(f"n{i}@example.com")))["id"] for i in range(3)]
    body = dict(group_body("Group"), members=[{"value": i, "display": "d" * 1000} for i in ids])
    assert len(orjson.dumps(body["members"])) > 2048
    group = created(post(capped, "/Groups", body))
    assert len(group["members"]) == 3


# ------------------------------------------------------------------ PATCH add dedup


def test_patch_add_keeps_one_of_each_value_in_order(capped):
    """RFC 7644 §3.5.2.1: adding values already there (in any key order) adds nothing; new ones are
    appended in the order sent."""
    user = created(post(capped, "/Users", user_body("dedup@example.com", emails=[{"value": "a@x.org", "type": "work"}])))
    add = patch_body({"op": "add", "path": "emails", "value": [
        {"type": "work", "value": "a@x.org"}, {"value": "b@x.org"}, {"value": "b@x.org"},
    ]})
    answer = send(capped, "PATCH", f"/Users/{user['id']}", add)
    assert answer.status_code == 200, answer.text
    assert [e["value"] for e in answer.json()["emails"]] == ["a@x.org", "b@x.org"]


# ------------------------------------------------------------------ discovery


def test_the_caps_are_discoverable_in_the_schemas(capped):
    """The RFC 7643 §5 ServiceProviderConfig has no room for these caps (strict clients refuse extra
    attributes there), so /Schemas descriptions carry them, from this deployment's settings."""
    schemas = {s["id"]: s for s in capped.get("/Schemas").json()["Resources"]}
    group = schemas[GROUP_SCHEMA]
    members = next(a for a in group["attributes"] if a["name"] == "members")
    assert "At most 3 members" in members["description"]
    emails_attr = next(a for a in schemas[USER_SCHEMA]["attributes"] if a["name"] == "emails")
    assert "At most 3 values" in emails_attr["description"]
    text = capped.get(f"/Schemas/{USER_SCHEMA}").json()["description"]
    for phrase in ("3 PATCH operations", "2048 bytes", "200 characters", "3 comparisons", "3 resources checked",
                   "3 names"):
        assert phrase in text, text
    config = capped.get("/ServiceProviderConfig").json()
    assert config["filter"]["maxResults"] == 1000 and config["bulk"]["maxOperations"] == 1000


# ------------------------------------------------------------------ caches


def test_long_filter_words_never_enter_a_cache():
    """The parser's caches are keyed on client text: a 5,000-character attribute name or date-like
    value is parsed without being kept (1,024 of them would otherwise pin megabytes)."""
    from api.scim import filter as scim_filter

    caches = (scim_filter._attr_path_cached, scim_filter._parse_datetime_cached)
    scim_filter.parse_filter('title eq "2024-01-01T00:00:00Z"')
    before = [cache.cache_info().currsize for cache in caches]
    for n in range(3):
        scim_filter.parse_filter(f'{"a" * 5000}{n} eq "2024-01-01T00:00:00Z{"0" * 5000}{n}"')
    assert [cache.cache_info().currsize for cache in caches] == before
