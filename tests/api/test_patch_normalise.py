"""A user PATCH normalises only what its operations changed (api/scim/schema.py normalise_patched).

The stored document was normalised when it was written; what a PATCH stores must
be exactly what normalising the whole patched document would store (RFC 7644
§3.5.2), and a PATCH refused one way is refused the other way too.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from api.scim.errors import ScimError
from api.scim.patch import Patcher
from api.scim.schema import ENTERPRISE_SCHEMA, USER_RESOURCE, normalise_patched, normalise_resource
from models.settings import ScimLimits

CORE = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
LIMITS = ScimLimits()

STORED_BODY = {
    "schemas": [CORE, ENTERPRISE_SCHEMA],
    "userName": "Ada@Example.com",
    "externalId": "ext-ada",
    "active": True,
    "displayName": "Ada Lovelace",
    "title": "Engineer",
    "name": {"formatted": "Ada Lovelace", "givenName": "Ada", "familyName": "Lovelace"},
    "emails": [{"value": "ada@example.com", "type": "work", "primary": True},
               {"value": "ada@home.example", "type": "home"}],
    "phoneNumbers": [{"value": "+44 20 0000 0000", "type": "work"}],
    "roles": [{"value": "Reader", "primary": True}],
    "preferredLanguage": "en-GB",
    "x-custom": {"kept": "as sent"},
    ENTERPRISE_SCHEMA: {"employeeNumber": "42", "department": "R&D", "manager": {"value": "boss-1"}},
}


def ops(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


PATCHES = {
    "replace displayName": ops({"op": "replace", "path": "displayName", "value": "Countess"}),
    "Entra active as a string": ops({"op": "Replace", "path": "active", "value": "False"}),
    "Entra pathless, dotted keys": ops({"op": "Add", "value": {"name.givenName": "Augusta", "title": "Analyst"}}),
    "replace a filtered email": ops({"op": "replace", "path": 'emails[type eq "work"].value', "value": "a@x.example"}),
    "add a primary email": ops({"op": "add", "path": "emails",
                                "value": [{"value": "new@x.example", "type": "other", "primary": True}]}),
    "remove phone numbers": ops({"op": "remove", "path": "phoneNumbers"}),
    "remove title": ops({"op": "remove", "path": "title"}),
    "enterprise department by path": ops({"op": "replace", "path": f"{ENTERPRISE_SCHEMA}:department",
                                          "value": "Maths"}),
    "Entra manager as a plain id": ops({"op": "replace", "path": f"{ENTERPRISE_SCHEMA}:manager", "value": "boss-2"}),
    "Entra manager emptied": ops({"op": "replace", "path": f"{ENTERPRISE_SCHEMA}:manager", "value": ""}),
    "Entra roles as JSON text": ops({"op": "replace", "path": "roles",
                                     "value": '[{"value":"Admin","primary":true},{"value":"Writer"}]'}),
    "replace userName": ops({"op": "replace", "path": "userName", "value": "ada.l@example.com"}),
    "displayName emptied": ops({"op": "replace", "path": "displayName", "value": ""}),
    "emails emptied": ops({"op": "replace", "path": "emails", "value": []}),
    "whole name replaced": ops({"op": "replace", "path": "name", "value": {"givenName": "A", "familyName": "L"}}),
    "pathless enterprise object": ops({"op": "replace", "value": {ENTERPRISE_SCHEMA: {"costCenter": "C1"}}}),
    "addresses added": ops({"op": "add", "path": "addresses",
                            "value": [{"type": "work", "streetAddress": "1 Way", "country": "GB"}]}),
    "nothing changed": ops({"op": "replace", "path": "displayName", "value": "Ada Lovelace"}),
    "several at once": ops({"op": "replace", "path": "title", "value": "Lead"},
                           {"op": "remove", "path": f"{ENTERPRISE_SCHEMA}:employeeNumber"},
                           {"op": "add", "path": "nickName", "value": "Ada"}),
    "a wrong type": ops({"op": "replace", "path": "active", "value": "perhaps"}),
}


def both_ways(patch: dict[str, Any], limits: ScimLimits = LIMITS) -> tuple[Any, Any]:
    """(normalise_patched's result, normalise_resource's), each a document or the error it raised."""
    stored = normalise_resource(USER_RESOURCE, STORED_BODY, LIMITS)
    outcomes = []
    for whole in (False, True):
        try:
            after = Patcher(USER_RESOURCE, copy.deepcopy(stored), limits=limits).apply(patch)
            outcomes.append(normalise_resource(USER_RESOURCE, after, limits) if whole
                            else normalise_patched(USER_RESOURCE, stored, after, limits))
        except ScimError as exc:
            outcomes.append((type(exc), exc.status, exc.scim_type))
    return outcomes[0], outcomes[1]


@pytest.mark.parametrize("name", list(PATCHES))
def test_a_patch_stores_what_normalising_the_whole_document_would(name):
    """Given a stored user (Entra-shaped, with the enterprise extension and an attribute we do not know)
    When a PATCH is applied
    Then normalising only the changed attributes gives the same document as normalising it whole,
    or the same SCIM error."""
    partial, whole = both_ways(PATCHES[name])
    assert partial == whole


def test_a_patch_that_makes_the_document_too_large_is_refused_either_way():
    """Given SCIM_MAX_DOCUMENT_BYTES of 2,048 and a PATCH adding a 3,000-character title
    Then both ways refuse it with 413 (the size is checked on the whole document, not on what changed)."""
    limits = ScimLimits(max_document_bytes=2048)
    partial, whole = both_ways(ops({"op": "replace", "path": "title", "value": "t" * 3000}), limits)
    assert partial == whole
    assert partial[1] == 413


def test_the_stored_extensions_follow_the_patch():
    """Given a PATCH that removes every enterprise attribute
    Then the stored `schemas` no longer declares the extension (RFC 7643 §3: schemas lists what the resource holds)."""
    patch = ops(*({"op": "remove", "path": f"{ENTERPRISE_SCHEMA}:{name}"}
                  for name in ("employeeNumber", "department", "manager")))
    partial, whole = both_ways(patch)
    assert partial == whole
    assert partial["schemas"] == [CORE] and ENTERPRISE_SCHEMA not in partial
