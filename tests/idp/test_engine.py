"""The replay engine's own rules: a matcher that accepted anything would make every scenario pass."""

from __future__ import annotations

import json

import pytest

from tests.idp.replay import _MISSING, FixtureError, load, parse_path, resolve, subset

DOC = {
    "id": "u1",
    "active": True,
    "name": {"givenName": "Ada", "familyName": "Lovelace"},
    "emails": [{"value": "a@x", "type": "work"}, {"value": "b@x", "type": "home"}],
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"manager": {"value": "m1"}},
}


def test_subset_accepts_what_is_there():
    assert subset({"name": {"givenName": "Ada"}, "emails": [{"type": "home"}, {"value": "a@x"}]}, DOC) == []


@pytest.mark.parametrize(
    "expected",
    [
        {"active": "True"},  # a string is not a boolean
        {"active": 1},  # nor is a number
        {"name": {"middleName": "X"}},  # a missing key
        {"emails": [{"type": "home"}, {"type": "home"}]},  # two expected elements, one actual
        {"emails": [{"type": "fax"}]},
        {"emails": {"type": "work"}},  # an object where a list is
    ],
)
def test_subset_refuses_what_is_not(expected):
    assert subset(expected, DOC) != []


def test_paths_reach_urn_keys_and_indexes():
    assert resolve(DOC, '["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"].manager.value') == "m1"
    assert resolve(DOC, "emails[1].type") == "home"
    assert resolve(DOC, "emails[2].type") is _MISSING
    assert resolve(DOC, "name.middleName") is _MISSING


def test_an_unquoted_urn_in_a_path_is_refused():
    """An unquoted URN splits at the dots of "2.0" and would silently never match."""
    with pytest.raises(FixtureError):
        parse_path("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User.manager")


def test_a_scenario_with_an_unknown_key_is_refused(tmp_path):
    """A typo ("expcet") would otherwise check nothing."""
    folder = tmp_path / "okta"
    folder.mkdir()
    path = folder / "typo.json"
    step = {"name": "x", "request": {"method": "GET", "path": "/Users"}, "expect": {"status": 200}, "expcet": {}}
    path.write_text(json.dumps({"description": "d", "sources": ["s"], "covers": [], "steps": [step]}))
    with pytest.raises(FixtureError, match="expcet"):
        load(path)


def test_then_checks_only_read(tmp_path):
    folder = tmp_path / "okta"
    folder.mkdir()
    path = folder / "write_in_then.json"
    then = {"name": "t", "request": {"method": "DELETE", "path": "/Users/x"}, "expect": {"status": 204}}
    step = {"name": "x", "request": {"method": "GET", "path": "/Users"}, "expect": {"status": 200}, "then": [then]}
    path.write_text(json.dumps({"description": "d", "sources": ["s"], "covers": [], "steps": [step]}))
    with pytest.raises(FixtureError, match="GET"):
        load(path)
