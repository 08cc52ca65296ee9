"""What the directory refuses, as domain errors; api/scim turns them into SCIM errors in one place."""

from __future__ import annotations


class DirectoryError(Exception):
    """A write or read the directory refuses; `message` is safe to show to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(DirectoryError):
    """No such user or group in this tenant."""


class UniquenessError(DirectoryError):
    """A name that must be unique in the tenant is already taken."""


class InvalidValueError(DirectoryError):
    """A value the mirror cannot store (missing, wrong type, too long, unknown member)."""


class UnavailableError(DirectoryError):
    """The database does not answer (restarting, unreachable): retry shortly."""
