"""Each 5xx the fuzz suite (tests/api/test_fuzz.py) found, as a focused test: now a 4xx that changes nothing."""

from __future__ import annotations

import pytest

from tests.api.helpers import assert_scim_error, create_user, patch_body, snapshot

SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"


@pytest.mark.parametrize("text", [
    'userName eq "\\ud800"',
    'externalId sw "a\\udfffb"',
    'title eq "\\ud800"',
    'emails[type eq "\\ud83d"]',
])
def test_a_lone_surrogate_escape_in_a_filter_is_400_invalid_filter(tenant, clean_db, text):
    """Found by the fuzz suite: `"\\ud800"` decodes to a lone surrogate, which neither the database
    driver nor the JSON encoder can take (a 500). It is no character (RFC 8259 §8.2): 400 invalidFilter,
    on GET and in a SearchRequest."""
    create_user(tenant.client, "s@example.com")
    assert_scim_error(tenant.client.get("/Users", params={"filter": text}), 400, "invalidFilter")
    search = tenant.client.post("/Users/.search", json={"schemas": [SEARCH], "filter": text})
    assert_scim_error(search, 400, "invalidFilter")


def test_a_surrogate_pair_escape_is_still_a_character(tenant, clean_db):
    """The fix refuses lone surrogates only: an escaped pair is one character and matches."""
    create_user(tenant.client, "smile😀@example.com")
    found = tenant.client.get("/Users", params={"filter": 'userName eq "smile\\ud83d\\ude00@example.com"'})
    assert found.status_code == 200 and found.json()["totalResults"] == 1


def test_a_lone_surrogate_in_a_patch_path_filter_is_400_and_changes_nothing(tenant, clean_db):
    """Found by the fuzz suite: replace of `emails[type eq "\\ud800"].value` created an element whose
    type could not be stored (a 500 after the write). Now a 400 invalidPath, and the user is unchanged."""
    user = create_user(tenant.client, "p@example.com", emails=[{"value": "a@example.com", "type": "work"}])
    before = snapshot(clean_db)
    response = tenant.client.patch(f"/Users/{user['id']}", json=patch_body(
        {"op": "replace", "path": 'emails[type eq "\\ud800"].value', "value": "x@example.com"}))
    assert_scim_error(response, 400, "invalidPath")
    assert snapshot(clean_db) == before


@pytest.mark.parametrize("text", [
    'meta.created gt "9999-12-31T23:59:59-14:00"',
    'meta.lastModified lt "0001-01-01T00:00:00+14:00"',
])
def test_a_date_outside_the_utc_range_is_400_invalid_filter(tenant, clean_db, text):
    """Found by the fuzz suite: a valid ISO 8601 date-time whose UTC form is before year 1 or after
    9999 overflowed when bound to the UTC column (a 500). Now 400 invalidFilter."""
    create_user(tenant.client, "d@example.com")
    body = assert_scim_error(tenant.client.get("/Users", params={"filter": text}), 400, "invalidFilter")
    assert "9999" in body["detail"]
    assert_scim_error(tenant.client.get("/Groups", params={"filter": text}), 400, "invalidFilter")


def test_remove_by_a_value_list_holding_objects_is_not_a_500(tenant, clean_db):
    """Remove by value list compared element values in a set: a `value` that is itself an object or a
    list (unhashable) raised a TypeError (a 500). Such a value matches no element: nothing is removed."""
    user = create_user(tenant.client, "r@example.com", emails=[{"value": "a@example.com", "type": "work"}])
    for odd in ({"a": 1}, ["a@example.com"]):
        response = tenant.client.patch(f"/Users/{user['id']}", json=patch_body(
            {"op": "remove", "path": "emails", "value": [{"value": odd}]}))
        assert response.status_code == 200, response.text
        assert [e["value"] for e in response.json()["emails"]] == ["a@example.com"]
    gone = tenant.client.patch(f"/Users/{user['id']}", json=patch_body(
        {"op": "remove", "path": "emails", "value": [{"value": "a@example.com"}]}))
    assert gone.status_code == 200 and "emails" not in gone.json()


@pytest.mark.parametrize("text", [
    'title gt "9999-12-31T23:59:59-14:00"',
    'emails.value lt "0001-01-01T00:00:00+14:00"',
])
def test_an_out_of_range_date_on_an_attribute_without_a_column_is_compared_not_a_500(tenant, clean_db, text):
    """Found by the fuzz suite after the issue 7 layout: the filter parser turned every date-like value
    into UTC, which overflows past year 9999 (a 500 while parsing). The value stays an aware date-time
    and compares as one: nothing matches, 200."""
    create_user(tenant.client, "late@example.com", title="2024-01-01T00:00:00Z",
                emails=[{"value": "2024-01-01T00:00:00Z"}])
    response = tenant.client.get("/Users", params={"filter": text})
    assert response.status_code == 200, response.text
    assert response.json()["totalResults"] == 0
