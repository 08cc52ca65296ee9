"""The replay engine's own rules: a matcher that accepted anything would make every scenario pass."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.idp.replay import _MISSING, FixtureError, Replay, load, parse_path, resolve, subset

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


# ------------------------------------------------- mapping, drain and admin checks


def _load_steps(tmp_path, steps):
    folder = tmp_path / "okta"
    folder.mkdir(exist_ok=True)
    path = folder / "case.json"
    path.write_text(json.dumps({"description": "d", "sources": ["s"], "covers": [], "steps": steps}))
    return load(path)


USERS_OK = {"a@x": {"role": "user", "license": "starter", "status": "active", "invited": True}}


@pytest.mark.parametrize(
    ("step", "complaint"),
    [
        ({"name": "m", "save_mapping": {"user_group": ["{g}"]}}, "user_group"),  # a typo of user_groups
        ({"name": "m", "save_mapping": {"license_groups": {"gold": ["{g}"]}}}, "gold"),  # no such tier
        ({"name": "m", "save_mapping": {"user_groups": "{g}"}}, "list"),
        ({"name": "d", "drain": True, "request": {"method": "GET", "path": "/Users"}}, "request"),
        ({"name": "d", "drain": "yes"}, "drain"),
        ({"name": "d", "drain": True, "save_mapping": {}}, "one of"),
        ({"name": "d", "drain": True, "then": [{"name": "t", "admin": "groups", "expect": {}}]}, "admin"),
        ({"name": "d", "drain": True, "then": [{"name": "t", "admin": "sync", "expect": "done"}]}, "caught_up"),
        # Role, license and status are always stated: a forgotten one would check nothing.
        ({"name": "d", "drain": True, "then": [{"name": "t", "admin": "users", "expect": {"a@x": {"role": "user", "status": "active"}}}]}, "license"),
        ({"name": "d", "drain": True, "then": [{"name": "t", "admin": "users", "expect": {"a@x": {**USERS_OK["a@x"], "licence": "team"}}}]}, "licence"),
        ({"name": "d", "drain": True, "then": [{"name": "t", "admin": "users", "expect": {"a@x": {**USERS_OK["a@x"], "invited": "yes"}}}]}, "invited"),
        ({"name": "d", "drain": True, "then": [{"name": "t", "admin": "users", "expect": {"a@x": {**USERS_OK["a@x"], "status": "gone"}}}]}, "status"),
        ({"name": "d", "drain": True, "then": [{"name": "t", "admin": "licenses", "expect": {"starter": {"purchased": 1, "assigned": 1}}}]}, "team"),
        ({"name": "d", "drain": True, "then": [{"name": "t", "admin": "users", "expect": USERS_OK, "request": {}}]}, "request"),
    ],
)
def test_pipeline_steps_and_admin_checks_are_refused_when_malformed(tmp_path, step, complaint):
    with pytest.raises(FixtureError, match=complaint):
        _load_steps(tmp_path, [step])


def test_pipeline_steps_and_admin_checks_load(tmp_path):
    steps = [
        {"name": "m", "save_mapping": {"user_groups": ["{g}"], "license_groups": {"team": ["{g}"]}, "auto_invite": True, "seat_cap": {"team": 2}}},
        {"name": "d", "drain": True, "then": [
            {"name": "u", "admin": "users", "expect": USERS_OK},
            {"name": "l", "admin": "licenses", "expect": {t: {"purchased": 0, "assigned": 0} for t in ("starter", "team", "enterprise")}},
            {"name": "p", "admin": "purchases", "expect": [{"status": "not_billed"}]},
            {"name": "s", "admin": "sync", "expect": "caught_up"},
        ]},
    ]
    assert len(_load_steps(tmp_path, steps).steps) == 2


def _users_check(tmp_path):
    scenario = _load_steps(tmp_path, [{"name": "d", "drain": True}])
    return Replay(scenario, None, None, SimpleNamespace(tenant_id="t", client=None))


ROW = {"id": "1", "userName": "a@x", "role": "user", "license": "starter", "status": "active", "active": True,
       "status_reason": None, "invited_at": "2025-01-01T00:00:00Z", "invite_error": None}


def test_the_users_check_matches_what_it_should(tmp_path):
    _users_check(tmp_path)._check_users("c", USERS_OK, [ROW])


@pytest.mark.parametrize(
    ("expect", "rows", "complaint"),
    [
        (USERS_OK, [ROW, {**ROW, "id": "2", "userName": "b@x"}], "does not list"),  # every user is stated
        ({**USERS_OK, "c@x": USERS_OK["a@x"]}, [ROW], "not in the admin's list"),
        ({"a@x": {**USERS_OK["a@x"], "invited": False}}, [ROW], "invited"),
        ({"a@x": {**USERS_OK["a@x"], "license": None}}, [ROW], "license"),
        ({"a@x": {**USERS_OK["a@x"], "invite_error": True}}, [ROW], "invite_error"),
        (USERS_OK, [ROW, {**ROW, "id": "2"}], "two users"),  # a deleted user and its successor
    ],
)
def test_the_users_check_refuses_what_is_not(tmp_path, expect, rows, complaint):
    with pytest.raises(AssertionError, match=complaint):
        _users_check(tmp_path)._check_users("c", expect, rows)
