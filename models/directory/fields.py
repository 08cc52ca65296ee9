"""The indexed string columns of the mirror: presence, type and length, and the case-folded keys."""

from __future__ import annotations

from typing import Any

from models.directory.errors import InvalidValueError

# user_name_key / display_name_key are VARCHAR(512) (models/tables.py).
KEY_LENGTH = 512


def required_string(data: dict[str, Any], name: str, max_length: int = 512) -> str:
    """A non-empty string attribute that fits its column."""
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise InvalidValueError(f"'{name}' is required and must be a non-empty string.")
    if len(value) > max_length:
        raise InvalidValueError(f"'{name}' is longer than {max_length} characters.")
    return value


def optional_string(data: dict[str, Any], name: str, max_length: int = 512) -> str | None:
    """A string attribute that fits its column, or None when absent."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidValueError(f"'{name}' must be a string.")
    if len(value) > max_length:
        raise InvalidValueError(f"'{name}' is longer than {max_length} characters.")
    return value


def folded_key(value: str, name: str) -> str:
    """str.casefold() of a name, for its lookup column; it may grow ("ß" → "ss") past the column."""
    key = value.casefold()
    if len(key) > KEY_LENGTH:
        raise InvalidValueError(f"'{name}' is longer than {KEY_LENGTH} characters once case-folded.")
    return key
