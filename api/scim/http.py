"""What every SCIM endpoint shares: body reading, the JSON response, auth, paging parameters."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson
from sqlalchemy import select, update
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from api.scim.errors import (
    InvalidSyntaxError,
    InvalidValueError,
    PayloadTooLargeError,
    PreconditionFailedError,
    ScimError,
    UnauthorizedError,
)
from api.scim.render import etag
from api.scim.schema import ERROR_SCHEMA, LIST_RESPONSE
from api.tokens import bearer, token_digest
from models.db import database_unavailable
from models.settings import ScimLimits
from models.tables import Tenant, utcnow

log = logging.getLogger(__name__)

SCIM_MEDIA_TYPE = "application/scim+json"
LAST_SEEN_EVERY_SECONDS = 30.0
MAX_INT_PARAM = 2**31 - 1
MAX_JSON_DEPTH = 32
# Bodies past this are parsed and validated in the thread pool, not on the event loop.
OFF_LOOP_BYTES = 64 * 1024


class ScimResponse(Response):
    """`application/scim+json`, serialised with orjson (the write path is hot)."""

    media_type = SCIM_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: ScimError) -> ScimResponse:
    """RFC 7644 §3.12: `status` is a string; `scimType` only where the RFC names one."""
    body: dict[str, Any] = {"schemas": [ERROR_SCHEMA], "status": str(exc.status), "detail": exc.detail}
    if exc.scim_type:
        body["scimType"] = exc.scim_type
    return ScimResponse(body, status_code=exc.status, headers=exc.headers)


class InternalError(ScimError):
    status = 500


def contained(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer an unexpected error with a plain SCIM 500 here, not in Starlette's outer
    middleware, which re-raises after answering and so resets the keep-alive connection."""

    async def serve(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ScimError:
            raise
        except ClientDisconnect:
            # The client hung up before its body arrived: nothing was written, nobody to answer.
            return Response(status_code=400)
        except Exception as exc:
            if database_unavailable(exc):
                raise  # a 503 with Retry-After, answered by the app's one handler for it
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return error_response(InternalError("Internal server error."))

    return serve


def list_response(total: int, start_index: int, resources: list[dict[str, Any]]) -> ScimResponse:
    return ScimResponse(
        {
            "schemas": [LIST_RESPONSE],
            "totalResults": total,
            "startIndex": start_index,
            "itemsPerPage": len(resources),
            "Resources": resources,
        }
    )


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON; 413 past `max_bytes`, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"The request body is larger than {max_bytes} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"The request body is larger than {max_bytes} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) > OFF_LOOP_BYTES:
        # A large body would hold the event loop (every other request) while it parses.
        return await run_in_threadpool(parse_json, raw)
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, checked storable; 400 when it is not JSON."""
    if not raw.strip():
        raise InvalidSyntaxError("The request body is empty; a JSON object is required.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidSyntaxError(f"The request body is not valid JSON ({exc.args[0].split(':')[0]}).") from None
    check_storable(body)
    return body


def check_storable(body: Any) -> None:
    """Refuse what parses but cannot be stored or answered: deep nesting, U+0000 in strings.

    orjson answers at most 254 levels deep, and PostgreSQL text cannot hold
    U+0000: either would otherwise surface as a 500 after the write.
    """
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidValueError("Strings in the request body may not contain U+0000.")
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise InvalidSyntaxError(f"The request body is nested deeper than {MAX_JSON_DEPTH} levels.")
            if isinstance(value, dict):
                for key, item in value.items():
                    if "\x00" in key:
                        raise InvalidValueError("Keys in the request body may not contain U+0000.")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


@dataclass
class Call:
    """One SCIM request as the synchronous handler sees it."""

    tenant_id: str
    params: dict[str, str]
    headers: dict[str, str]
    path: dict[str, str]
    body: Any
    base_url: str
    limits: ScimLimits

    def int_param(self, name: str, default: int) -> int:
        raw = self.params.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise InvalidValueError(f"'{name}' must be an integer.") from None
        # Past any page anyway; keeps OFFSET and the echoed startIndex within 32 bits.
        return max(-MAX_INT_PARAM, min(value, MAX_INT_PARAM))

    def check_if_match(self, version: int) -> None:
        """RFC 7644 §3.14: a stale If-Match is a 412; `*` matches any version."""
        header = self.headers.get("if-match")
        if not header:
            return
        tags = [t.strip() for t in header.split(",")]
        current = etag(version)
        if "*" in tags or current in tags or current.removeprefix("W/") in tags:
            return
        raise PreconditionFailedError(f"The resource changed: its version is {current}.")


_TENANT = Tenant.__table__


@dataclass(frozen=True)
class AuthorizedTenant:
    """The tenant a SCIM request's token opened."""

    id: str


class Authenticator:
    """Tenant tokens, looked up by digest on every request (no cache: revocation works at once)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last_seen: dict[str, float] = {}

    def tenant(self, session: Session, tenant_id: str, authorization: str | None) -> tuple[AuthorizedTenant, bool]:
        """The tenant the token belongs to, and whether last_request_at was written in this transaction."""
        token = bearer(authorization)
        if token is None:
            raise UnauthorizedError()
        # Two columns through Core: this runs on every request.
        found = session.connection().execute(
            select(_TENANT.c.id, _TENANT.c.scim_enabled).where(_TENANT.c.token_hash == token_digest(token))
        ).first()
        # Another tenant's valid token is as wrong as no token.
        if found is None or found.id != tenant_id or not found.scim_enabled:
            raise UnauthorizedError()
        tenant = AuthorizedTenant(found.id)
        if self.due(tenant_id):
            self.touch(session, tenant_id)
            return tenant, True
        return tenant, False

    def due(self, tenant_id: str) -> bool:
        """Whether last_request_at should be written now (and note that it will be)."""
        # last_request_at is for the admin's eyes; writing it at most every
        # 30 s per process keeps the tenant row out of the hot path.
        now = self.clock()
        if now - self._last_seen.get(tenant_id, -LAST_SEEN_EVERY_SECONDS) >= LAST_SEEN_EVERY_SECONDS:
            self._last_seen[tenant_id] = now
            return True
        return False

    @staticmethod
    def touch(session: Session, tenant_id: str) -> None:
        session.connection().execute(update(_TENANT).where(_TENANT.c.id == tenant_id).values(last_request_at=utcnow()))
