"""userName uniqueness and the userName filter agree, for every kind of name an IdP sends.

An IdP decides whether to create a user by asking `filter=userName eq "X"`: if
that finds nothing, it POSTs, and a 409 there would wedge its cycle (Entra and
Okta retry the same create forever); if it finds the user, a POST would be a
duplicate. So both must apply the same rule (RFC 7643 §4.1.1: userName is
caseExact false): str.casefold(), DESIGN.md "Deleted users ... free their userName".
"""

from __future__ import annotations

import unicodedata

import pytest

from tests.conftest import connect_tenant

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"

# (stored, asked): case folding, not lower(), and nothing beyond it (no Unicode normalisation).
PAIRS = [
    pytest.param("Ada.Lovelace@Example.com", "ada.lovelace@EXAMPLE.COM", id="ascii-case"),
    pytest.param("Straße@example.de", "STRASSE@example.de", id="sharp-s-folds-to-ss"),
    pytest.param("ΟΔΟΣ@example.gr", "οδος@example.gr", id="greek-final-sigma"),
    pytest.param("\u212aelvin@example.com", "kelvin@example.com", id="kelvin-sign"),
    pytest.param("\ufb03x@example.com", "FFIX@example.com", id="ffi-ligature"),
    pytest.param("Ǆemal@example.ba", "ǆemal@example.ba", id="dz-digraph"),
    pytest.param("Émile@example.fr", "émile@example.fr", id="latin-accent-case"),
    pytest.param("Иван@example.ru", "иВАН@example.ru", id="cyrillic-case"),
    pytest.param("İpek@example.tr", "ipek@example.tr", id="turkish-dotted-capital-i-differs"),
    pytest.param("ılgın@example.tr", "Ilgın@example.tr", id="turkish-dotless-i-differs"),
    pytest.param("café@example.fr", unicodedata.normalize("NFD", "café@example.fr"), id="nfc-vs-nfd-differ"),
    pytest.param("ＡＢＣ@example.jp", "abc@example.jp", id="fullwidth-differs"),
    pytest.param("鈴木@example.jp", "鈴木@example.jp", id="cjk-identical"),
    pytest.param("user@example.com", "user@example.com ", id="trailing-space-differs"),
]


def _found(client, name: str) -> bool:
    response = client.get("/Users", params={"filter": f'userName eq "{name}"'})
    assert response.status_code == 200, response.text
    total = response.json()["totalResults"]
    assert total in (0, 1), response.text
    return total == 1


def _create(client, name: str) -> tuple[int, str | None]:
    response = client.post("/Users", json={"schemas": [USER], "userName": name})
    assert response.status_code in (201, 409), response.text
    if response.status_code == 409:
        assert response.json()["scimType"] == "uniqueness", response.text
    return response.status_code, response.json().get("id")


@pytest.mark.parametrize(("stored", "asked"), PAIRS)
def test_post_conflicts_exactly_when_the_filter_finds_the_name(admin, stored, asked):
    """Given a user with one name, when the IdP asks the filter for another spelling and then
    POSTs it, then the POST is a 409 exactly when the filter found a user, and a 201 otherwise;
    the same holds the other way round, and for a PATCH that renames another user."""
    same = stored.casefold() == asked.casefold()
    tenant = connect_tenant(admin, "unique", "okta")
    client = tenant.client
    try:
        for first, second in ((stored, asked), (asked, stored)):
            status, first_id = _create(client, first)
            assert status == 201
            found = _found(client, second)
            assert found == same, f"filter userName eq {second!r} with {first!r} stored"

            # A PATCH renaming someone else to that spelling follows the same rule.
            _, other_id = _create(client, "someone.else@example.com")
            renamed = client.patch(
                f"/Users/{other_id}",
                json={"schemas": [PATCH_OP], "Operations": [{"op": "replace", "path": "userName", "value": second}]},
            )
            assert renamed.status_code == (409 if found else 200), renamed.text
            if found:
                assert renamed.json()["scimType"] == "uniqueness"
            else:
                # The rename took the name: now the filter finds it, and a POST conflicts.
                assert _found(client, second)
                assert _create(client, second)[0] == 409
                assert client.delete(f"/Users/{other_id}").status_code == 204
                other_id = None

            status, second_id = _create(client, second)
            assert status == (409 if found else 201)
            if not found:
                # Both exist side by side, each found by its own spelling only.
                assert _found(client, first) and _found(client, second)
                assert client.delete(f"/Users/{second_id}").status_code == 204
            for user_id in (first_id, other_id):
                if user_id:
                    assert client.delete(f"/Users/{user_id}").status_code == 204
            # Deleted users free their names (DESIGN.md).
            assert not _found(client, first) and not _found(client, second)
    finally:
        client.close()
