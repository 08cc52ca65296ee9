"""The one translation of the directory's domain errors into SCIM errors (RFC 7644 §3.12)."""

from __future__ import annotations

import pytest

from api.scim import errors as scim
from api.scim.errors import from_directory
from models.directory import errors as directory


@pytest.mark.parametrize(
    ("domain", "status", "scim_type"),
    [
        (directory.NotFoundError, 404, None),
        (directory.UniquenessError, 409, "uniqueness"),
        (directory.InvalidValueError, 400, "invalidValue"),
        (directory.DirectoryError, 400, "invalidValue"),
    ],
)
def test_each_directory_error_becomes_its_scim_error_with_the_same_message(domain, status, scim_type):
    translated = from_directory(domain("the message"))
    assert isinstance(translated, scim.ScimError)
    assert (translated.status, translated.scim_type, translated.detail) == (status, scim_type, "the message")
