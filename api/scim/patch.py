"""PATCH (RFC 7644 §3.5.2) applied to a resource document; group members become row changes."""

from __future__ import annotations

from typing import Any

import orjson

from api.scim import filter as scim_filter
from api.scim.errors import (
    InvalidFilterError,
    InvalidPathError,
    InvalidSyntaxError,
    InvalidValueError,
    MutabilityError,
    NoTargetError,
    TooManyError,
)
from api.scim.schema import (
    EXTERNAL_ID,
    PATCH_OP,
    Attr,
    ResourceSchema,
    check_value_count,
    coerce_ext_value,
    coerce_value,
)
from models.directory.members import MemberChanges
from models.settings import ScimLimits

# Attributes a client may echo back but never change: silently ignored in
# pathless values (Okta's group rename PATCH carries the group's `id`).
_IGNORED_TOP = {"id", "meta", "schemas"}


def member_values(value: Any) -> dict[str, str | None]:
    """Member references from a PATCH value: [{"value": id, "type"?}] (Entra adds "$ref": null)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise InvalidValueError("'members' must be a list of {\"value\": id} objects.")
    out: dict[str, str | None] = {}
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("value"), str) or not item["value"]:
            raise InvalidValueError("Each member must be an object with a string 'value'.")
        member_type = item.get("type")
        if member_type is not None and member_type not in ("User", "Group"):
            raise InvalidValueError("A member's 'type' must be 'User' or 'Group'.")
        out[item["value"]] = member_type
    return out


def _filter_member_ids(node: Any) -> list[str]:
    """`members[value eq "a" or value eq "b"]` → ["a", "b"]."""
    if isinstance(node, scim_filter.Or):
        return _filter_member_ids(node.left) + _filter_member_ids(node.right)
    if (
        isinstance(node, scim_filter.Compare)
        and node.op == "eq"
        and node.path.key in ("value", "members.value")
        and isinstance(node.value, str)
    ):
        return [node.value]
    raise InvalidFilterError("A filter on 'members' may only compare 'value' with eq (joined by or).")


class Patcher:
    """Applies PatchOp operations to `doc` (and, for groups, collects member changes)."""

    def __init__(
        self,
        resource: ResourceSchema,
        doc: dict[str, Any],
        members: MemberChanges | None = None,
        *,
        limits: ScimLimits,
    ) -> None:
        self.resource = resource
        self.doc = doc
        self.members = members
        self.limits = limits
        # Member references this request names, counted against max_members.
        self.member_refs = 0

    def apply(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidSyntaxError("The PATCH body must be a JSON object.")
        schemas = body.get("schemas")
        if schemas is not None and (not isinstance(schemas, list) or PATCH_OP not in schemas):
            raise InvalidSyntaxError(f"'schemas' must be ['{PATCH_OP}'].")
        operations = body.get("Operations", body.get("operations"))
        if operations is None:
            raise InvalidSyntaxError("'Operations' is required.")
        if not isinstance(operations, list):
            raise InvalidSyntaxError("'Operations' must be a list.")
        if len(operations) > self.limits.max_patch_operations:
            raise InvalidValueError(
                f"At most {self.limits.max_patch_operations} operations per PATCH (SCIM_MAX_PATCH_OPERATIONS, "
                f"advertised as patch.maxOperations); {len(operations)} were given."
            )
        for index, operation in enumerate(operations):
            self._operation(operation, index)
        return self.doc

    def _operation(self, operation: Any, index: int) -> None:
        if not isinstance(operation, dict):
            raise InvalidSyntaxError(f"Operation {index} must be an object.")
        op = operation.get("op")
        # Entra (default mode) capitalises ops: "Add", "Replace", "Remove".
        op = op.lower() if isinstance(op, str) else None
        if op not in ("add", "replace", "remove"):
            raise InvalidSyntaxError(f"Operation {index}: 'op' must be add, replace or remove.")
        path = operation.get("path")
        value = operation.get("value")
        if path is not None and not isinstance(path, str):
            raise InvalidPathError(f"Operation {index}: 'path' must be a string.")
        if path is None or not path.strip():
            if op == "remove":
                raise NoTargetError(f"Operation {index}: remove needs a 'path'.")
            if not isinstance(value, dict):
                raise InvalidValueError(f"Operation {index}: without a path, 'value' must be an object.")
            for key, sub_value in value.items():
                if key.lower() in _IGNORED_TOP:
                    continue
                ext = self.resource.is_extension(key)
                if ext is not None and isinstance(sub_value, dict):
                    for ext_key, ext_value in sub_value.items():
                        self._at_path(op, f"{ext.id}:{ext_key}", ext_value)
                    continue
                # Entra's pathless values hold dotted keys ("name.givenName")
                # and extension URN keys: both are paths.
                self._at_path(op, key, sub_value)
            return
        self._at_path(op, path, value)

    def _at_path(self, op: str, path: str, value: Any) -> None:
        ext = self.resource.is_extension(path.strip())
        if ext is not None:
            self._extension(op, ext, value)
            return
        try:
            parsed = scim_filter.parse_path(
                path, max_length=self.limits.max_filter_length, max_terms=self.limits.max_filter_terms
            )
        except scim_filter.FilterTooLargeError as exc:
            raise TooManyError(f"The path is too large: {exc.detail}.") from None
        except scim_filter.FilterError as exc:
            raise InvalidPathError(f"Invalid path '{path}': {exc}") from None
        container, attr = self._resolve(parsed.path)
        sub_name = parsed.sub or parsed.path.sub
        if attr.name == "members" and self.members is not None and container is self.doc:
            self._members(op, parsed, value)
            return
        if attr.mutability == "readOnly":
            raise MutabilityError(f"'{attr.name}' is read-only.")
        sub = None
        if sub_name is not None:
            sub = attr.child(sub_name)
            if sub is None:
                raise InvalidPathError(f"'{attr.name}' has no sub-attribute '{sub_name}'.")
            if sub.mutability == "readOnly":
                raise MutabilityError(f"'{attr.name}.{sub.name}' is read-only.")
        if parsed.value_filter is not None:
            if not attr.multi_valued:
                raise InvalidPathError(f"'{attr.name}' is not multi-valued; it takes no filter.")
            self._filtered(op, container, attr, parsed.value_filter, sub, value)
        elif sub is not None:
            self._sub(op, container, attr, sub, value)
        else:
            self._whole(op, container, attr, value)

    def _extension(self, op: str, ext: Any, value: Any) -> None:
        """A path naming a whole extension (RFC 7644 §3.5.2: the URN alone)."""
        if op == "remove" or _is_empty(value):
            self.doc.pop(ext.id, None)
            return
        if not isinstance(value, dict):
            raise InvalidValueError(f"'{ext.id}' takes an object.")
        if op == "replace":
            self.doc.pop(ext.id, None)
        for key, sub_value in value.items():
            if key.lower() == "schemas":
                continue
            self._at_path("replace" if op == "replace" else op, f"{ext.id}:{key}", sub_value)

    def _resolve(self, path: scim_filter.AttrPath) -> tuple[dict[str, Any], Attr]:
        if path.uri and path.uri.lower() != self.resource.core.id.lower():
            ext = self.resource.schema_for(path.uri)
            if ext is None:
                raise InvalidPathError(f"Unknown schema '{path.uri}'.")
            attr = ext.attr(path.attr)
            if attr is None:
                raise InvalidPathError(f"Unknown attribute '{path.attr}' in '{ext.id}'.")
            container = self.doc.get(ext.id)
            if not isinstance(container, dict):
                container = {}
                self.doc[ext.id] = container
            return container, attr
        attr = self.resource.core.attr(path.attr)
        if attr is None and path.attr.lower() == "externalid":
            # A common attribute (RFC 7643 §3.1), not in the core schema's list.
            attr = EXTERNAL_ID
        if attr is None:
            if path.attr.lower() in _IGNORED_TOP:
                raise MutabilityError(f"'{path.attr}' is read-only.")
            raise InvalidPathError(f"Unknown attribute '{path.attr}'.")
        return self.doc, attr

    def _coerce(self, container: dict[str, Any], attr: Attr, value: Any, where: str, *, element: bool = False) -> Any:
        if container is not self.doc:
            return coerce_ext_value(attr, value, where)
        return coerce_value(attr, value, where, element=element)

    def _whole(self, op: str, container: dict[str, Any], attr: Attr, value: Any) -> None:
        key = _existing_key(container, attr.name)
        if op == "remove":
            current = container.get(key)
            if attr.multi_valued and isinstance(value, list) and isinstance(current, list):
                # Remove by value list: exactly the listed elements, never all of them.
                gone = {_identity(item.get("value")) for item in value if isinstance(item, dict)}
                container[key] = [
                    e for e in current if not (isinstance(e, dict) and _identity(e.get("value")) in gone)
                ]
            else:
                container.pop(key, None)
            return
        if _is_empty(value):
            # Entra's "null update": replacing with "" or null clears the attribute.
            container.pop(key, None)
            return
        # Refused before any work on the values (the result is checked again when stored).
        check_value_count(self.resource, attr.name, value, self.limits)
        coerced = self._coerce(container, attr, value, attr.name)
        current = container.pop(key, None)
        if op == "add" and attr.multi_valued:
            # RFC 7644 §3.5.2.1: values already there are not added again. A set of
            # canonical forms keeps this linear (it runs under the row lock).
            merged = list(current) if isinstance(current, list) else []
            seen = {_identity(item) for item in merged}
            for item in coerced:
                identity = _identity(item)
                if identity not in seen:
                    seen.add(identity)
                    merged.append(item)
            container[attr.name] = _one_primary(merged)
        elif attr.type == "complex" and not attr.multi_valued:
            # RFC 7644 §3.5.2.1 and §3.5.2.3: add or replace of a complex attribute sets
            # the sub-attributes the value names; the others are left unchanged (Okta
            # and Google replace "name" with only the sub-attribute that changed). A
            # sub-attribute given as "" or null is cleared, as the null update expects.
            # A reference (manager) with a new "value" is another referent: its old
            # displayName and $ref do not carry over.
            keep = isinstance(current, dict) and not (coerced and "value" in coerced)
            merged = {**current, **(coerced or {})} if keep else dict(coerced or {})
            for sub_key, sub_value in (value.items() if isinstance(value, dict) else ()):
                if _is_empty(sub_value):
                    sub = attr.child(sub_key)
                    merged.pop(_existing_key(merged, sub.name if sub else sub_key), None)
            if merged:
                container[attr.name] = merged
        elif attr.multi_valued:
            container[attr.name] = _one_primary(coerced)
        else:
            container[attr.name] = coerced

    def _sub(self, op: str, container: dict[str, Any], attr: Attr, sub: Attr, value: Any) -> None:
        key = _existing_key(container, attr.name)
        current = container.get(key)
        if attr.multi_valued:
            # A sub-attribute of every element (RFC 7644 §3.5.2: e.g. emails.type).
            if op == "remove" or _is_empty(value):
                for element in current or []:
                    if isinstance(element, dict):
                        element.pop(_existing_key(element, sub.name), None)
                return
            coerced = coerce_value(sub, value, f"{attr.name}.{sub.name}")
            for element in current or []:
                if isinstance(element, dict):
                    element[sub.name] = coerced
            return
        if op == "remove" or _is_empty(value):
            if isinstance(current, dict):
                current.pop(_existing_key(current, sub.name), None)
                if not current:
                    container.pop(key, None)
            return
        coerced = coerce_value(sub, value, f"{attr.name}.{sub.name}")
        if not isinstance(current, dict):
            current = {}
        container.pop(key, None)
        current[sub.name] = coerced
        container[attr.name] = current

    def _filtered(self, op: str, container: dict[str, Any], attr: Attr, node: Any, sub: Attr | None, value: Any) -> None:
        node = _typed_filter(attr, node)
        key = _existing_key(container, attr.name)
        elements = container.get(key)
        if not isinstance(elements, list):
            elements = []
        hits = [e for e in elements if isinstance(e, dict) and self._element_matches(attr, node, e)]
        if op == "remove":
            if sub is None:
                gone = {id(hit) for hit in hits}
                elements = [e for e in elements if id(e) not in gone]
            else:
                for hit in hits:
                    hit.pop(_existing_key(hit, sub.name), None)
            container.pop(key, None)
            if elements:
                container[attr.name] = elements
            return
        if not hits:
            # Create-if-absent: Entra sends replace of emails[type eq "work"].value
            # for a user who has no work email yet.
            if _is_empty(value):
                return
            element = _element_from_filter(node)
            if sub is not None:
                element[sub.name] = coerce_value(sub, value, f"{attr.name}.{sub.name}")
            else:
                element.update(self._coerce(container, attr, value, attr.name, element=True))
            elements.append(element)
        else:
            for hit in hits:
                if sub is not None:
                    if _is_empty(value):
                        hit.pop(_existing_key(hit, sub.name), None)
                    else:
                        hit[sub.name] = coerce_value(sub, value, f"{attr.name}.{sub.name}")
                else:
                    coerced = self._coerce(container, attr, value, attr.name, element=True)
                    if op == "replace":
                        hit.clear()
                    hit.update(coerced)
        container.pop(key, None)
        container[attr.name] = _one_primary(elements)

    def _element_matches(self, attr: Attr, node: Any, element: dict[str, Any]) -> bool:
        def case_exact(path_key: str) -> bool:
            sub = attr.child(path_key.rsplit(".", 1)[-1])
            return bool(sub and sub.case_exact)

        return scim_filter.matches(node, element, case_exact)

    def _count_members(self, count: int) -> None:
        self.member_refs += count
        if self.member_refs > self.limits.max_members:
            raise InvalidValueError(
                f"At most {self.limits.max_members} members per request (SCIM_MAX_MEMBERS); "
                f"this PATCH names {self.member_refs} or more."
            )

    def _members(self, op: str, parsed: Any, value: Any) -> None:
        assert self.members is not None
        if parsed.value_filter is not None:
            if op != "remove":
                raise InvalidPathError("Members are added or replaced through the 'members' path, without a filter.")
            member_ids = _filter_member_ids(parsed.value_filter)
            self._count_members(len(member_ids))
            for member_id in member_ids:
                self.members.remove_member(member_id)
            return
        if isinstance(value, list):
            # Counted before they are read, so an oversized list costs no more work.
            self._count_members(len(value))
        members = member_values(value)
        if not isinstance(value, list):
            self._count_members(len(members))
        if op == "add":
            for member_id, member_type in members.items():
                self.members.add_member(member_id, member_type)
        elif op == "replace":
            self.members.replace_all(members)
        elif value is None:
            # RFC 7644 §3.5.2.2: remove with the path "members" and no value removes them all.
            self.members.replace_all({})
        else:
            # Entra removes members by a value list: exactly those, never all.
            for member_id in members:
                self.members.remove_member(member_id)


def _identity(value: Any) -> Any:
    """A hashable stand-in for a JSON value: equal for equal values, whatever their key order."""
    if isinstance(value, dict):
        try:
            # The usual element ({"value", "type", "primary"}) holds only scalars.
            return frozenset(value.items())
        except TypeError:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    if isinstance(value, list):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return value


def _existing_key(container: dict[str, Any], name: str) -> str:
    """The key under which `name` is stored, whatever case the client first used."""
    if name in container:
        return name
    lowered = name.lower()
    for key in container:
        if key.lower() == lowered:
            return key
    return name


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _one_primary(elements: list[Any]) -> list[Any]:
    """RFC 7643 §2.4: at most one element has primary=true; the last one set wins."""
    primaries = [e for e in elements if isinstance(e, dict) and e.get("primary") is True]
    for element in primaries[:-1]:
        element["primary"] = False
    return elements


def _typed_filter(attr: Attr, node: Any) -> Any:
    """A value filter whose booleans are booleans.

    Entra's role mapping targets `roles[primary eq "True"].value`: the string
    "True" compared with the boolean sub-attribute `primary` would match no
    element, and create one whose primary is the string "True".
    """
    if isinstance(node, (scim_filter.And, scim_filter.Or)):
        return type(node)(_typed_filter(attr, node.left), _typed_filter(attr, node.right))
    if isinstance(node, scim_filter.Not):
        return scim_filter.Not(_typed_filter(attr, node.node))
    if isinstance(node, scim_filter.Compare) and isinstance(node.value, str) and node.op in ("eq", "ne"):
        sub = attr.child(node.path.sub or node.path.attr)
        if sub is not None and sub.type == "boolean" and node.value.strip().lower() in ("true", "false"):
            return scim_filter.Compare(node.path, node.op, node.value.strip().lower() == "true")
    return node


def _element_from_filter(node: Any) -> dict[str, Any]:
    """`type eq "work" and primary eq true` → {"type": "work", "primary": True}."""
    if isinstance(node, scim_filter.And):
        return {**_element_from_filter(node.left), **_element_from_filter(node.right)}
    if isinstance(node, scim_filter.Compare) and node.op == "eq":
        return {node.path.attr if node.path.sub is None else node.path.sub: node.value}
    raise NoTargetError("No element matches the filter, and it cannot be created from it.")
