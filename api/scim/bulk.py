"""POST /Bulk (RFC 7644 §3.7): operations in order, each in its own transaction, bulkId references resolved."""

from __future__ import annotations

import re
from typing import Any, Callable

import orjson
from starlette.responses import Response

from api.scim.errors import (
    InvalidSyntaxError,
    InvalidValueError,
    PayloadTooLargeError,
    ScimError,
    database_unavailable_error,
)
from api.scim.http import Call, ScimResponse, error_response
from api.scim.schema import BULK_REQUEST, BULK_RESPONSE
from models.db import database_unavailable

MAX_OPERATIONS = 1000
_BULK_ID = re.compile(r"bulkId:([A-Za-z0-9_.\-~]+)")
_PATH = re.compile(r"^/(Users|Groups)(?:/([^/?#]+))?$")

# (method, resource, has id) → name of the ScimApi handler
_ROUTES = {
    ("POST", "Users", False): "create_user",
    ("PUT", "Users", True): "replace_user",
    ("PATCH", "Users", True): "patch_user",
    ("DELETE", "Users", True): "delete_user",
    ("POST", "Groups", False): "create_group",
    ("PUT", "Groups", True): "replace_group",
    ("PATCH", "Groups", True): "patch_group",
    ("DELETE", "Groups", True): "delete_group",
}


class UnresolvedBulkId(InvalidValueError):
    status = 409


def _resolve(value: Any, ids: dict[str, str]) -> Any:
    """Replace "bulkId:x" with the id created by the operation that carried bulkId x."""
    if isinstance(value, str):
        def swap(match: re.Match[str]) -> str:
            created = ids.get(match.group(1))
            if created is None:
                raise UnresolvedBulkId(f"bulkId '{match.group(1)}' does not name an earlier, successful POST.")
            return created

        return _BULK_ID.sub(swap, value)
    if isinstance(value, list):
        return [_resolve(item, ids) for item in value]
    if isinstance(value, dict):
        return {key: _resolve(item, ids) for key, item in value.items()}
    return value


def parse_request(body: Any) -> tuple[list[dict[str, Any]], int | None]:
    if not isinstance(body, dict):
        raise InvalidSyntaxError("A BulkRequest body must be a JSON object.")
    schemas = body.get("schemas")
    if not isinstance(schemas, list) or BULK_REQUEST not in schemas:
        raise InvalidSyntaxError(f"'schemas' must be ['{BULK_REQUEST}'].")
    operations = body.get("Operations")
    if not isinstance(operations, list):
        raise InvalidSyntaxError("'Operations' must be a list.")
    if len(operations) > MAX_OPERATIONS:
        raise PayloadTooLargeError(f"At most {MAX_OPERATIONS} operations per bulk request.")
    fail_on_errors = body.get("failOnErrors")
    if fail_on_errors is not None and (not isinstance(fail_on_errors, int) or isinstance(fail_on_errors, bool) or fail_on_errors < 1):
        raise InvalidValueError("'failOnErrors' must be a whole number of at least 1.")
    return operations, fail_on_errors


def run_bulk(
    body: Any,
    call: Call,
    dispatch: Callable[[str, Call], Response],
) -> ScimResponse:
    """Run each operation through `dispatch(handler_name, call)`; collect one result per operation."""
    operations, fail_on_errors = parse_request(body)
    created: dict[str, str] = {}
    results: list[dict[str, Any]] = []
    errors = 0
    for index, operation in enumerate(operations):
        if fail_on_errors is not None and errors >= fail_on_errors:
            break
        result: dict[str, Any] = {}
        match: re.Match[str] | None = None
        try:
            if not isinstance(operation, dict):
                raise InvalidSyntaxError(f"Operation {index} must be an object.")
            method = str(operation.get("method", "")).upper()
            result["method"] = method
            bulk_id = operation.get("bulkId")
            if bulk_id is not None:
                result["bulkId"] = bulk_id
            if method == "POST" and not isinstance(bulk_id, str):
                raise InvalidSyntaxError("A POST operation needs a 'bulkId'.")
            path = _resolve(operation.get("path"), created)
            match = _PATH.match(path) if isinstance(path, str) else None
            if match is None:
                raise InvalidSyntaxError(f"Operation {index}: 'path' must be /Users, /Groups or one of their ids.")
            resource, resource_id = match.group(1), match.group(2)
            handler = _ROUTES.get((method, resource, resource_id is not None))
            if handler is None:
                raise InvalidSyntaxError(f"Operation {index}: {method} {path} is not a bulk operation.")
            data = _resolve(operation.get("data"), created) if method != "DELETE" else None
            if method != "DELETE" and not isinstance(data, dict):
                raise InvalidSyntaxError(f"Operation {index}: 'data' must be an object.")
            headers = dict(call.headers)
            headers.pop("if-match", None)
            if isinstance(operation.get("version"), str):
                headers["if-match"] = operation["version"]
            sub_call = Call(call.tenant_id, {}, headers, {"tenant_id": call.tenant_id, "id": resource_id or ""},
                            data, call.base_url, call.limits)
            response = dispatch(handler, sub_call)
        except ScimError as exc:
            response = error_response(exc)
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            # RFC 7644 §3.7.3: each operation has its own status. The operations before
            # this one are committed; this one (and any after, while the outage lasts)
            # changed nothing and says so, so the IdP resends just those.
            response = error_response(database_unavailable_error())
        status = response.status_code
        result["status"] = str(status)
        if status >= 400:
            errors += 1
            result["response"] = orjson.loads(response.body)
        else:
            location = response.headers.get("location")
            if status == 201 and location:
                new_id = location.rsplit("/", 1)[-1]
                if isinstance(result.get("bulkId"), str):
                    created[result["bulkId"]] = new_id
            elif resource_id := (match.group(2) if match else None):
                location = f"{call.base_url}/{match.group(1)}/{resource_id}"
            if location:
                result["location"] = location
            if response.headers.get("etag"):
                result["version"] = response.headers["etag"]
        results.append(result)
    return ScimResponse({"schemas": [BULK_RESPONSE], "Operations": results})
