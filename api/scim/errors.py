"""SCIM errors as classes carrying `status` and `scimType` (RFC 7644 §3.12)."""

from __future__ import annotations

from models.directory import errors as directory


class ScimError(Exception):
    """A SCIM error answer; one handler turns it into the error body."""

    status: int = 400
    scim_type: str | None = None

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class InvalidFilterError(ScimError):
    scim_type = "invalidFilter"


class InvalidSyntaxError(ScimError):
    scim_type = "invalidSyntax"


class InvalidValueError(ScimError):
    scim_type = "invalidValue"


class InvalidPathError(ScimError):
    scim_type = "invalidPath"


class NoTargetError(ScimError):
    scim_type = "noTarget"


class MutabilityError(ScimError):
    scim_type = "mutability"


class UniquenessError(ScimError):
    status = 409
    scim_type = "uniqueness"


class TooManyError(ScimError):
    scim_type = "tooMany"


class InvalidVersionError(ScimError):
    scim_type = "invalidVers"


class UnauthorizedError(ScimError):
    status = 401

    def __init__(self, detail: str = "Authorization failure: missing, wrong or revoked bearer token.") -> None:
        # RFC 6750 §3: a 401 names the auth scheme the client should use.
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="SCIM"'})


class NotFoundError(ScimError):
    status = 404


class MethodNotAllowedError(ScimError):
    status = 405


class PreconditionFailedError(ScimError):
    status = 412


class PayloadTooLargeError(ScimError):
    status = 413


class UnsupportedMediaTypeError(ScimError):
    status = 415


class TooManyRequestsError(ScimError):
    status = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class NotImplementedScimError(ScimError):
    status = 501


class ServiceUnavailableError(ScimError):
    """503 with Retry-After (RFC 7231 §6.6.4): the database does not answer; the client retries."""

    status = 503
    RETRY_AFTER_SECONDS = 2

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": str(self.RETRY_AFTER_SECONDS)})


# What a 503 asks the client to wait: a PostgreSQL restart or failover takes seconds.
DATABASE_RETRY_AFTER_SECONDS = ServiceUnavailableError.RETRY_AFTER_SECONDS
DATABASE_UNAVAILABLE = "The database is unavailable for a moment; send the request again shortly."


def database_unavailable_error() -> ServiceUnavailableError:
    """The SCIM error for a request (or a Bulk operation) the database could not take."""
    return ServiceUnavailableError(DATABASE_UNAVAILABLE)


# The one place the directory's domain errors become SCIM errors (RFC 7644 §3.12).
_FROM_DIRECTORY: dict[type[directory.DirectoryError], type[ScimError]] = {
    directory.NotFoundError: NotFoundError,
    directory.UniquenessError: UniquenessError,
    directory.InvalidValueError: InvalidValueError,
    directory.UnavailableError: ServiceUnavailableError,
    directory.DirectoryError: InvalidValueError,
}


def from_directory(exc: directory.DirectoryError) -> ScimError:
    """The SCIM error (status, scimType) for what the directory refused, with its message."""
    for kind in type(exc).__mro__:
        if kind in _FROM_DIRECTORY:
            return _FROM_DIRECTORY[kind](exc.message)
    raise TypeError(f"not a DirectoryError: {exc!r}")
