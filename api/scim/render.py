"""Stored rows to SCIM JSON, and the `attributes`/`excludedAttributes` projection (RFC 7644 §3.9)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

import orjson

from api.scim.errors import InvalidValueError, TooManyError
from api.scim.schema import (
    GROUP_SCHEMA,
    LEGACY_CORE_SCHEMAS,
    USER_SCHEMA,
    ResourceSchema,
)
from models.settings import ScimLimits
from models.tables import as_utc

ALWAYS = {"id", "schemas"}
_CORE_PREFIXES = tuple(s.lower() + ":" for s in (USER_SCHEMA, GROUP_SCHEMA, *LEGACY_CORE_SCHEMAS))


def iso(moment: datetime) -> str:
    return as_utc(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def etag(version: int) -> str:
    return f'W/"{version}"'


def meta(resource_type: str, location: str, created: datetime, modified: datetime, version: int) -> dict[str, Any]:
    return {
        "resourceType": resource_type,
        "created": iso(created),
        "lastModified": iso(modified),
        "location": location,
        "version": etag(version),
    }


def user_json(row: Any, base_url: str, groups: Iterable[tuple[str, str]] | None = None) -> dict[str, Any]:
    """A User as SCIM JSON; `groups` are (id, displayName) of its direct groups."""
    location = f"{base_url}/Users/{row.id}"
    out: dict[str, Any] = {"id": row.id}
    out.update(row.data)
    out["schemas"] = row.data.get("schemas") or [USER_SCHEMA]
    out["userName"] = row.user_name
    if "active" in row.data:
        out["active"] = row.active
    if row.external_id is not None:
        out["externalId"] = row.external_id
    if groups:
        out["groups"] = [
            {"value": gid, "$ref": f"{base_url}/Groups/{gid}", "display": name, "type": "direct"}
            for gid, name in groups
        ]
    out["meta"] = meta("User", location, row.created_at, row.updated_at, row.version)
    return out


def group_json(row: Any, base_url: str, members: Iterable[tuple[str, str]] | None) -> dict[str, Any]:
    """A Group as SCIM JSON; `members` are (id, type) pairs, or None when not loaded."""
    location = f"{base_url}/Groups/{row.id}"
    out: dict[str, Any] = {"id": row.id}
    out.update(row.data)
    out["schemas"] = [GROUP_SCHEMA]
    out["displayName"] = row.display_name
    if row.external_id is not None:
        out["externalId"] = row.external_id
    if members is not None:
        out["members"] = [
            {"value": mid, "$ref": f"{base_url}/{'Groups' if mtype == 'Group' else 'Users'}/{mid}", "type": mtype}
            for mid, mtype in members
        ]
    out["meta"] = meta("Group", location, row.created_at, row.updated_at, row.version)
    return out


def user_doc(user: Any) -> dict[str, Any]:
    """The stored document with the column-held attributes, as PATCH and PUT see it."""
    # A deep copy: PATCH edits nested values in place, and SQLAlchemy compares
    # the JSON column with the loaded object to decide whether to write it.
    doc = orjson.loads(orjson.dumps(user.data))
    doc["userName"] = user.user_name
    if user.external_id is not None:
        doc["externalId"] = user.external_id
    return doc


def group_doc(group: Any) -> dict[str, Any]:
    """The stored document of a group without its members, as PATCH sees it."""
    doc = orjson.loads(orjson.dumps(group.data))
    doc["schemas"] = [GROUP_SCHEMA]
    doc["displayName"] = group.display_name
    if group.external_id is not None:
        doc["externalId"] = group.external_id
    return doc


def _split(resource: ResourceSchema, path: str) -> tuple[str, str | None]:
    """'name.givenName' → ('name', 'givenname'); an extension URN path → (urn, attr)."""
    raw = path.strip()
    lowered = raw.lower()
    for prefix in _CORE_PREFIXES:
        if lowered.startswith(prefix):
            raw = raw[len(prefix):]
            lowered = raw.lower()
            break
    for ext in resource.extensions:
        urn = ext.id.lower()
        if lowered == urn:
            return ext.id, None
        if lowered.startswith(urn + ":"):
            return ext.id, lowered[len(urn) + 1:].split(".", 1)[0]
    if not raw or lowered.startswith("urn:"):
        raise InvalidValueError(f"Unknown attribute '{path}' in attributes or excludedAttributes.")
    head, _, sub = lowered.partition(".")
    return head, sub or None


def parse_attribute_list(
    resource: ResourceSchema, value: str | list[str] | None, limits: ScimLimits
) -> list[tuple[str, str | None]]:
    """`attributes` or `excludedAttributes` as (head, sub) pairs; more names than the cap is a 400 tooMany."""
    if not value:
        return []
    items = value if isinstance(value, list) else value.split(",")
    if len(items) > limits.max_attribute_names:
        # Blank items ("a,,b", a trailing comma) are not names.
        names = sum(1 for item in items if item.strip())
        if names > limits.max_attribute_names:
            raise TooManyError(
                f"At most {limits.max_attribute_names} names in 'attributes' or 'excludedAttributes' "
                f"(SCIM_MAX_ATTRIBUTE_NAMES); {names} were given."
            )
    return [_split(resource, item) for item in items if item.strip()]


def wants(paths: list[tuple[str, str | None]], top: str) -> bool:
    top = top.lower()
    return any(head.lower() == top for head, _ in paths)


def project(
    resource: ResourceSchema,
    doc: dict[str, Any],
    attributes: list[tuple[str, str | None]],
    excluded: list[tuple[str, str | None]],
) -> dict[str, Any]:
    """Apply RFC 7644 §3.9: `attributes` wins over `excludedAttributes`; id and schemas always stay."""
    if attributes:
        out: dict[str, Any] = {}
        for key, value in doc.items():
            lowered = key.lower()
            if lowered in ALWAYS:
                out[key] = value
                continue
            subs = [sub for head, sub in attributes if head.lower() == lowered]
            if not subs:
                continue
            if None in subs or not isinstance(value, (dict, list)):
                out[key] = value
            else:
                out[key] = _keep_subs(value, {s for s in subs if s})
        return out
    if excluded:
        out = {}
        for key, value in doc.items():
            lowered = key.lower()
            subs = [sub for head, sub in excluded if head.lower() == lowered]
            if not subs or lowered in ALWAYS:
                out[key] = value
            elif None in subs:
                continue
            else:
                out[key] = _drop_subs(value, {s for s in subs if s})
        return out
    return doc


def _keep_subs(value: Any, subs: set[str]) -> Any:
    if isinstance(value, list):
        return [_keep_subs(item, subs) for item in value]
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k.lower() in subs}
    return value


def _drop_subs(value: Any, subs: set[str]) -> Any:
    if isinstance(value, list):
        return [_drop_subs(item, subs) for item in value]
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k.lower() not in subs}
    return value
