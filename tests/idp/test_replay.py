"""Replay each IdP's documented request shapes (tests/idp/<idp>/*.json) against the live app.

One test per scenario file: a fresh tenant connected for that file's IdP, the
steps in order, each answer checked, then the state read back. The format is in
tests/idp/README.md; the bullets of issue 4 each scenario covers are listed in
its "covers", and `test_every_issue_bullet_has_a_scenario` keeps that honest.
"""

from __future__ import annotations

import pytest

from tests.conftest import connect_tenant
from tests.idp.replay import IDPS, Replay, load, scenario_files

# Issue 4, "IdP dialects" and the Microsoft gallery validation list (direct-SCIM
# part), plus the RFC behaviours the brief wants seen in a replay at least once.
BULLETS = {
    # Entra, default PATCH mode
    "entra.capitalised_ops": 'Entra default mode: "Add", "Replace", "Remove"',
    "entra.string_booleans": 'Entra default mode: booleans as strings ("False", "true")',
    "entra.pathless_dotted_and_urn_keys": 'pathless replace/add whose value holds dotted keys and extension URNs',
    "entra.single_value_as_list": 'Entra default mode: a single-valued attribute added as [{"value": …}]',
    "entra.remove_members_by_value_list": "remove of members by value list removes exactly those members",
    "entra.null_ref_members": '"$ref": null in member values',
    "entra.roles_as_json_string": "roles values sent as a JSON string",
    "entra.manager_string_or_object": "manager as a plain string or {value}",
    "entra.empty_operations": "empty Operations",
    "entra.operation_name_key": 'an operation carrying an extra "name" key',
    "entra.patch_body_id": 'a top-level "id" in a PATCH body',
    "entra.adscimversion_header": "ADSCIMVersion header tolerated",
    "entra.no_user_agent": "missing User-Agent tolerated",
    "entra.group_get_excluded_members": "group GETs with excludedAttributes=members",
    "entra.test_connection_random_username": "test-connection query for a random userName: 200 + empty list",
    # Entra with ?aadOptscim062020
    "aadopt.lowercase_ops": "aadOptscim062020: lowercase ops",
    "aadopt.real_booleans": "aadOptscim062020: real booleans",
    "aadopt.members_filter_remove": 'aadOptscim062020: members[value eq "…"] removes',
    # Okta
    "okta.test_connection": "GET /Users?startIndex=1&count=2 to test the connection",
    "okta.filter_username_count_100": 'filter=userName eq "…" with count=100',
    "okta.put_user": "PUT of the whole user (losing active:true deactivates)",
    "okta.pathless_deactivate": 'deactivation by pathless {"op":"replace","value":{"active":false}}',
    "okta.group_rename_with_id": "group rename PATCH carrying id in its value on every membership push",
    "okta.group_put_member_diff": "PUT /Groups/{id} with the full member list, applied as a diff",
    "okta.password_and_groups_in_post": "password and groups in POST bodies tolerated (never stored; groups read-only)",
    # OneLogin, PingOne, Google
    "onelogin.trailing_ampersand": "a trailing & in queries",
    "onelogin.legacy_urn_put": "legacy schema URNs (urn:scim:schemas:core:2.0) tolerated on PUT",
    "pingone.group_put": "PUT of groups by default",
    "pingone.group_patch": "PATCH of groups when enabled",
    "google.users": "what Google Workspace's SCIM app sends for users",
    "google.group_push": "Google Workspace group push",
    "any_dialect.provider_switch": "requests accepted in every dialect: a tenant switching IdP keeps working",
    # Microsoft gallery validation, direct-SCIM part
    "gallery.null_update": 'null update: replace optional attributes with "", then with null, clears them',
    "gallery.manager_add_replace_remove": 'manager set (Add), change (Replace), remove (Replace with "")',
    "gallery.user_round_trip": "user create/update round trip",
    "gallery.group_round_trip": "group create/update round trip",
    "gallery.pagination_count_5": "pagination with count=5 over several pages, startIndex echoed",
    "gallery.schema_discovery": "schema discoverability",
    # RFC 7644 behaviours seen in at least one replay
    "rfc.attributes_projection": "attributes / excludedAttributes (RFC 7644 §3.9)",
    "rfc.sort": "sortBy / sortOrder (RFC 7644 §3.4.2.3)",
    "rfc.etag_if_match": "ETag, If-Match (412) and If-None-Match (304) (RFC 7644 §3.14)",
    # Issue 4 with the pipeline issue: "roles and licenses after each IdP's flow"
    "e2e.entra": "Entra (default mode): roles and licenses after its provisioning and deprovisioning flow",
    "e2e.entra_aadoptscim062020": "Entra with aadOptscim062020: roles and licenses after its flow",
    "e2e.okta": "Okta: roles and licenses after its flow",
    "e2e.onelogin": "OneLogin: roles and licenses after its flow",
    "e2e.pingone": "PingOne: roles and licenses after its flow",
    "e2e.google": "Google Workspace: roles and licenses after its flow",
}

SCENARIOS = [load(path) for path in scenario_files()]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_replay(scenario, admin, engine, base_settings):
    """Given a tenant connected for the scenario's IdP, when the IdP's documented requests are
    replayed in order, then each answer and the state read back are what the file says."""
    tenant = connect_tenant(admin, f"replay {scenario.id}", scenario.provider)
    try:
        replay = Replay(scenario, admin, engine, tenant, base_settings)
        replay.run()
    finally:
        tenant.client.close()
    assert replay.requests > 0


def test_every_idp_has_scenarios():
    """Each IdP folder holds at least one scenario file."""
    found = {s.idp for s in SCENARIOS}
    assert found == set(IDPS)


def test_every_idp_has_an_end_to_end_scenario():
    """Each IdP folder ends its flow in roles and licenses: a scenario that saves the mapping,
    drains the pipeline after provisioning and again after deprovisioning, and checks the
    admin's users, licenses and sync state; its bullet is e2e.<folder>."""

    def checks(step):
        return {check["admin"] for check in step.get("then", []) if "admin" in check}

    for idp in IDPS:
        ends = [
            s for s in SCENARIOS
            if s.idp == idp
            and any("save_mapping" in step for step in s.steps)
            and sum("drain" in step for step in s.steps) >= 2
            and {"users", "licenses", "sync"} <= set().union(*(checks(step) for step in s.steps if "drain" in step))
        ]
        assert ends, f"{idp}: no scenario saves a mapping, drains twice and checks users, licenses and sync"
        assert any(f"e2e.{idp}" in s.covers for s in ends), f"{idp}: its end-to-end scenario does not cover e2e.{idp}"


def test_every_issue_bullet_has_a_scenario():
    """Every bullet of issue 4's "IdP dialects" and gallery list is covered by a scenario,
    and no scenario claims a bullet that does not exist."""
    covered = {bullet for s in SCENARIOS for bullet in s.covers}
    assert sorted(set(BULLETS) - covered) == []
    assert sorted(covered - set(BULLETS)) == []
