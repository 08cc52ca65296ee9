"""The request caps and database timeouts come from the environment, once, with sane defaults."""

from __future__ import annotations

import pytest

from models.settings import ScimLimits, Settings, SettingsError


def test_defaults_are_bounded():
    """With nothing set every cap is on: 64 KiB documents, 30 s statements, 10 s connects."""
    settings = Settings.from_env({})
    assert settings.scim_limits == ScimLimits()
    assert settings.scim_limits.max_document_bytes == 65536
    assert settings.database_statement_timeout == 30.0
    assert settings.database_connect_timeout == 10.0
    assert settings.scim_create_batch_max == 64


def test_each_cap_is_read_from_its_variable():
    env = {
        "SCIM_MAX_PATCH_OPERATIONS": "7",
        "SCIM_MAX_VALUES": "8",
        "SCIM_MAX_MEMBERS": "9",
        "SCIM_MAX_ATTRIBUTE_NAMES": "10",
        "SCIM_MAX_FILTER_LENGTH": "11",
        "SCIM_MAX_FILTER_TERMS": "12",
        "SCIM_MAX_FILTER_CANDIDATES": "13",
        "SCIM_MAX_DOCUMENT_BYTES": "4096",
        "DATABASE_STATEMENT_TIMEOUT": "2.5",
        "DATABASE_CONNECT_TIMEOUT": "3",
        "SCIM_CREATE_BATCH_MAX": "1",
    }
    settings = Settings.from_env(env)
    assert settings.scim_create_batch_max == 1
    assert settings.scim_limits == ScimLimits(7, 8, 9, 10, 11, 12, 13, 4096)
    assert (settings.database_statement_timeout, settings.database_connect_timeout) == (2.5, 3.0)


@pytest.mark.parametrize("name, value", [
    ("SCIM_MAX_PATCH_OPERATIONS", "0"),
    ("SCIM_MAX_MEMBERS", "many"),
    ("SCIM_MAX_DOCUMENT_BYTES", "100"),
    ("DATABASE_STATEMENT_TIMEOUT", "-1"),
    ("DATABASE_STATEMENT_TIMEOUT", "inf"),
    ("DATABASE_CONNECT_TIMEOUT", "nan"),
    ("DATABASE_CONNECT_TIMEOUT", "0"),
    ("SCIM_CREATE_BATCH_MAX", "0"),
])
def test_unusable_values_are_refused_with_the_variable_named(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_a_statement_timeout_of_0_turns_it_off():
    assert Settings.from_env({"DATABASE_STATEMENT_TIMEOUT": "0"}).database_statement_timeout == 0.0
