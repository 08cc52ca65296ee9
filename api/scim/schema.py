"""SCIM schemas as data (RFC 7643 §7, §8.7): validation, /Schemas and filter rules read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from api.scim.errors import InvalidSyntaxError, InvalidValueError, PayloadTooLargeError
from models.settings import ScimLimits

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_SCHEMA = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
LIST_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
SEARCH_REQUEST = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
BULK_REQUEST = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
BULK_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:BulkResponse"
# OneLogin still sends the pre-RFC core URN on some connectors.
LEGACY_CORE_SCHEMAS = {"urn:scim:schemas:core:2.0", "urn:scim:schemas:core:1.0"}
# ...and its SCIM JSON templates name the enterprise extension by its pre-RFC URN.
LEGACY_ENTERPRISE_SCHEMAS = {"urn:scim:schemas:extension:enterprise:2.0", "urn:scim:schemas:extension:enterprise:1.0"}


@dataclass(frozen=True)
class Attr:
    """One attribute definition, named as in RFC 7643 §7."""

    name: str
    type: str = "string"
    multi_valued: bool = False
    required: bool = False
    case_exact: bool = False
    mutability: str = "readWrite"
    returned: str = "default"
    uniqueness: str = "none"
    description: str = ""
    sub: tuple["Attr", ...] = ()
    canonical: tuple[str, ...] = ()
    reference_types: tuple[str, ...] = ()

    def child(self, name: str) -> "Attr | None":
        name = name.lower()
        for attr in self.sub:
            if attr.name.lower() == name:
                return attr
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "multiValued": self.multi_valued,
            "description": self.description or self.name,
            "required": self.required,
            "caseExact": self.case_exact,
            "mutability": self.mutability,
            "returned": self.returned,
            "uniqueness": self.uniqueness,
        }
        if self.sub:
            out["subAttributes"] = [attr.to_json() for attr in self.sub]
        if self.canonical:
            out["canonicalValues"] = list(self.canonical)
        if self.type == "reference":
            out["referenceTypes"] = list(self.reference_types or ("external",))
        return out


def _multi(name: str, *, value_type: str = "string", types: tuple[str, ...] = (), description: str = "",
           ref_types: tuple[str, ...] = (), mutability: str = "readWrite") -> Attr:
    """The usual value/display/type/primary multi-valued complex attribute (RFC 7643 §2.4)."""
    return Attr(
        name,
        type="complex",
        multi_valued=True,
        description=description,
        mutability=mutability,
        sub=(
            Attr("value", type=value_type, reference_types=ref_types, mutability=mutability),
            Attr("display", mutability=mutability),
            Attr("type", canonical=types, mutability=mutability),
            Attr("primary", type="boolean", mutability=mutability),
        ),
    )


ID = Attr("id", case_exact=True, mutability="readOnly", returned="always", uniqueness="server",
          description="Unique identifier issued by the service provider.")
EXTERNAL_ID = Attr("externalId", case_exact=True, description="Identifier issued by the provisioning client.")

ROLES = _multi("roles")

USER_ATTRS: tuple[Attr, ...] = (
    Attr("userName", required=True, uniqueness="server", description="Unique identifier for the User."),
    Attr("name", type="complex", sub=(
        Attr("formatted"), Attr("familyName"), Attr("givenName"), Attr("middleName"),
        Attr("honorificPrefix"), Attr("honorificSuffix"),
    )),
    Attr("displayName"),
    Attr("nickName"),
    Attr("profileUrl", type="reference", reference_types=("external",)),
    Attr("title"),
    Attr("userType"),
    Attr("preferredLanguage"),
    Attr("locale"),
    Attr("timezone"),
    Attr("active", type="boolean"),
    Attr("password", mutability="writeOnly", returned="never"),
    _multi("emails", types=("work", "home", "other")),
    _multi("phoneNumbers", types=("work", "home", "mobile", "fax", "pager", "other")),
    _multi("ims", types=("aim", "gtalk", "icq", "xmpp", "msn", "skype", "qq", "yahoo")),
    _multi("photos", value_type="reference", types=("photo", "thumbnail"), ref_types=("external",)),
    Attr("addresses", type="complex", multi_valued=True, sub=(
        Attr("formatted"), Attr("streetAddress"), Attr("locality"), Attr("region"),
        Attr("postalCode"), Attr("country"), Attr("type", canonical=("work", "home", "other")),
        Attr("primary", type="boolean"),
    )),
    Attr("groups", type="complex", multi_valued=True, mutability="readOnly", sub=(
        Attr("value", mutability="readOnly"),
        Attr("$ref", type="reference", reference_types=("User", "Group"), mutability="readOnly"),
        Attr("display", mutability="readOnly"),
        Attr("type", canonical=("direct", "indirect"), mutability="readOnly"),
    )),
    _multi("entitlements"),
    ROLES,
    _multi("x509Certificates", value_type="binary"),
)

ENTERPRISE_ATTRS: tuple[Attr, ...] = (
    Attr("employeeNumber"),
    Attr("costCenter"),
    Attr("organization"),
    Attr("division"),
    Attr("department"),
    Attr("manager", type="complex", sub=(
        Attr("value"),
        Attr("$ref", type="reference", reference_types=("User",)),
        Attr("displayName", mutability="readOnly"),
    )),
)

GROUP_ATTRS: tuple[Attr, ...] = (
    Attr("displayName", required=True, description="A human-readable name for the Group."),
    Attr("members", type="complex", multi_valued=True, sub=(
        Attr("value", mutability="immutable"),
        Attr("$ref", type="reference", reference_types=("User", "Group"), mutability="immutable"),
        Attr("type", canonical=("User", "Group"), mutability="immutable"),
        Attr("display", mutability="readOnly"),
    )),
)


@dataclass(frozen=True)
class Schema:
    id: str
    name: str
    description: str
    attributes: tuple[Attr, ...]
    _index: dict[str, Attr] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({attr.name.lower(): attr for attr in self.attributes})

    def attr(self, name: str) -> Attr | None:
        return self._index.get(name.lower())

    def to_json(self, base_url: str) -> dict[str, Any]:
        return {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "attributes": [attr.to_json() for attr in self.attributes],
            "meta": {"resourceType": "Schema", "location": f"{base_url}/Schemas/{self.id}"},
        }


USER = Schema(USER_SCHEMA, "User", "User Account", USER_ATTRS)
ENTERPRISE_USER = Schema(ENTERPRISE_SCHEMA, "EnterpriseUser", "Enterprise User", ENTERPRISE_ATTRS)
GROUP = Schema(GROUP_SCHEMA, "Group", "Group", GROUP_ATTRS)
ALL_SCHEMAS = (USER, ENTERPRISE_USER, GROUP)


@dataclass(frozen=True)
class ResourceSchema:
    """A resource type: its core schema and its extensions (RFC 7643 §6)."""

    name: str
    endpoint: str
    core: Schema
    extensions: tuple[Schema, ...] = ()

    def schema_for(self, urn: str) -> Schema | None:
        urn = urn.lower()
        if urn == self.core.id.lower():
            return self.core
        for ext in self.extensions:
            if ext.id.lower() == urn:
                return ext
        return None

    def is_extension(self, key: str) -> Schema | None:
        if not key.lower().startswith("urn:"):
            return None
        for ext in self.extensions:
            if ext.id.lower() == key.lower():
                return ext
        return None


USER_RESOURCE = ResourceSchema("User", "/Users", USER, (ENTERPRISE_USER,))
GROUP_RESOURCE = ResourceSchema("Group", "/Groups", GROUP)

_READ_ONLY_TOP = {"id", "meta", "schemas"}
_TRUE = {"true"}
_FALSE = {"false"}


def coerce_boolean(value: Any, where: str) -> bool:
    """Booleans; Entra's default mode sends them as the strings "True"/"False"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise InvalidValueError(f"'{where}' must be a boolean, got {value!r:.60}.")


def _coerce_scalar(attr: Attr, value: Any, where: str) -> Any:
    if value is None:
        return None
    if attr.type == "boolean":
        return coerce_boolean(value, where)
    if attr.type in ("string", "reference", "binary", "dateTime"):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # Some IdPs send numeric-looking strings (employeeNumber) as numbers.
            return str(value)
        raise InvalidValueError(f"'{where}' must be a string.")
    if attr.type == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InvalidValueError(f"'{where}' must be an integer.")
    if attr.type == "decimal":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise InvalidValueError(f"'{where}' must be a number.")
    return value


def coerce_value(attr: Attr, value: Any, where: str, *, element: bool = False) -> Any:
    """Check and normalise one attribute value against its definition."""
    if value is None:
        return None
    if attr is ROLES and not element:
        value = _entra_roles(value)
    if not attr.multi_valued and attr.type != "complex" and _is_value_list(value):
        # Entra (default PATCH mode, no aadOptscim062020) adds a single-valued
        # attribute as [{"value": "Babs"}]: the element's value is the value.
        value = value[0]["value"]
    if attr.multi_valued and not element:
        if isinstance(value, dict):
            # A single object where a list belongs: accept it as a one-element list.
            value = [value]
        if not isinstance(value, list):
            raise InvalidValueError(f"'{where}' must be a list.")
        return [coerce_value(attr, item, where, element=True) for item in value if item is not None]
    if attr.type == "complex":
        if not isinstance(value, dict):
            raise InvalidValueError(f"'{where}' must be an object.")
        out: dict[str, Any] = {}
        for key, sub_value in value.items():
            sub = attr.child(key)
            if sub is None:
                # Unknown sub-attributes are kept as sent: we mirror the IdP.
                out[key] = sub_value
                continue
            coerced = coerce_value(sub, sub_value, f"{where}.{sub.name}")
            if coerced is not None:
                out[sub.name] = coerced
        return out
    return _coerce_scalar(attr, value, where)


def _is_value_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and set(value[0]) == {"value"}


# Role objects are shallow: [{"value": …, "display": …}]. Deeper JSON text is refused.
_MAX_ROLE_JSON_DEPTH = 4


def _json_text(text: str) -> Any:
    """The JSON a string holds when it is a JSON array or object, else None.

    The decoded value never went through the body checks (api/scim/http.py
    `check_storable`), so it gets them here: shallow, and no U+0000.
    """
    stripped = text.strip()
    if not stripped.startswith(("[", "{")):
        return None
    try:
        decoded = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return None
    stack: list[tuple[Any, int]] = [(decoded, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str) and "\x00" in value:
            raise InvalidValueError("Roles may not contain U+0000.")
        if isinstance(value, (dict, list)):
            if depth > _MAX_ROLE_JSON_DEPTH:
                raise InvalidValueError("Roles sent as JSON text are nested too deeply.")
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            stack.extend((key, depth) for key, _ in items if isinstance(key, str))
            stack.extend((item, depth + 1) for _, item in items)
    return decoded


def _entra_roles(value: Any) -> Any:
    """App roles as Entra's PATCH sends them, as a proper list of role objects.

    Entra (default PATCH mode) sends `roles` as JSON text: the whole list
    ("[{\"value\":\"Admin\",\"primary\":true}]"), one role name ("Admin"), or, with
    AppRoleAssignmentsComplex, elements whose "value" is the app role serialised
    as JSON ({"id", "value", "displayName"}).
    """
    if isinstance(value, str):
        decoded = _json_text(value)
        if decoded is None:
            return [{"value": value}] if value.strip() else []
        value = decoded
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return value
    roles = []
    for item in value:
        inner = _json_text(item["value"]) if isinstance(item, dict) and isinstance(item.get("value"), str) else None
        if isinstance(inner, dict) and "value" in inner:
            item = {**{k: v for k, v in item.items() if k != "value"}, **inner}
            if "displayName" in item and "display" not in item:
                item["display"] = item.pop("displayName")
        roles.append(item)
    return roles


def check_value_count(resource: ResourceSchema, name: str, value: Any, limits: ScimLimits) -> None:
    """A list holds at most max_values values (a group's members: max_members); else a 400 invalidValue."""
    if not isinstance(value, list):
        return
    if resource is GROUP_RESOURCE and name.lower() == "members":
        if len(value) > limits.max_members:
            raise InvalidValueError(
                f"At most {limits.max_members} members per request (SCIM_MAX_MEMBERS); {len(value)} were given."
            )
    elif len(value) > limits.max_values:
        raise InvalidValueError(
            f"'{name}' holds {len(value)} values; at most {limits.max_values} are allowed (SCIM_MAX_VALUES)."
        )


def check_document_size(doc: dict[str, Any], limits: ScimLimits) -> None:
    """The document we would store (members are rows, not counted) is at most max_document_bytes; else a 413."""
    stored = {key: value for key, value in doc.items() if key != "members"} if "members" in doc else doc
    size = len(orjson.dumps(stored))
    if size > limits.max_document_bytes:
        raise PayloadTooLargeError(
            f"The resource would be stored as {size} bytes of JSON; at most {limits.max_document_bytes} "
            "are allowed (SCIM_MAX_DOCUMENT_BYTES)."
        )


def normalise_resource(resource: ResourceSchema, body: Any, limits: ScimLimits) -> dict[str, Any]:
    """Validate a POST/PUT body (or a PATCH result) against the schema and the limits;
    return the attributes to store (no id, meta, password)."""
    if not isinstance(body, dict):
        raise InvalidSyntaxError("The request body must be a JSON object.")
    schemas = body.get("schemas")
    if not isinstance(schemas, list) or not all(isinstance(s, str) for s in schemas):
        raise InvalidSyntaxError(f"'schemas' must be a list holding '{resource.core.id}'.")
    lowered = {s.lower() for s in schemas}
    if resource.core.id.lower() not in lowered and not lowered & LEGACY_CORE_SCHEMAS:
        raise InvalidSyntaxError(f"'schemas' must include '{resource.core.id}'.")
    out: dict[str, Any] = {}
    for key, value in body.items():
        lowered_key = key.lower()
        if lowered_key in _READ_ONLY_TOP:
            continue
        if lowered_key in LEGACY_ENTERPRISE_SCHEMAS:
            # OneLogin (SCIM templates "Core"/"Enterprise"): the pre-RFC URN of
            # the enterprise extension holds the same attributes.
            key = ENTERPRISE_SCHEMA
        ext = resource.is_extension(key)
        if ext is not None:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise InvalidValueError(f"'{ext.id}' must be an object.")
            ext_out = out.get(ext.id, {})
            for ext_key, ext_value in value.items():
                check_value_count(resource, ext_key, ext_value, limits)
                attr = ext.attr(ext_key)
                if attr is None:
                    ext_out[ext_key] = ext_value
                    continue
                coerced = coerce_ext_value(attr, ext_value, f"{ext.id}:{attr.name}")
                if coerced is not None:
                    ext_out[attr.name] = coerced
            if ext_out:
                out[ext.id] = ext_out
            continue
        attr = resource.core.attr(key)
        if attr is None:
            check_value_count(resource, key, value, limits)
            out[key] = value
            continue
        if attr.mutability == "readOnly" or attr.mutability == "writeOnly":
            # readOnly attributes sent by a client are ignored (RFC 7643 §2.2);
            # writeOnly ones (password) are never stored.
            continue
        check_value_count(resource, attr.name, value, limits)
        coerced = coerce_value(attr, value, attr.name)
        # Again after coercion: Entra's roles arrive as one JSON text holding the list.
        check_value_count(resource, attr.name, coerced, limits)
        if coerced is not None and coerced != []:
            out[attr.name] = coerced
    out["schemas"] = declared_schemas(resource, out)
    check_document_size(out, limits)
    return out


_ABSENT = object()


def normalise_patched(
    resource: ResourceSchema, before: dict[str, Any], after: dict[str, Any], limits: ScimLimits,
) -> dict[str, Any]:
    """What `normalise_resource(resource, after, limits)` stores, where `after` is a PATCH applied to `before`,
    the stored document (normalised when it was written): only the top-level attributes the operations changed
    are normalised again; the extensions declared and the document's size are checked on the whole.

    normalise_resource treats each top-level attribute on its own and leaves its own
    output as it is, so this is the same document for less work. Anything else (a
    changed `schemas`, a key not spelt as the schema spells it, the pre-RFC
    enterprise URN, whose attributes merge with the extension's) is normalised whole.
    """
    changed = [key for key, value in after.items() if before.get(key, _ABSENT) != value]
    if (not isinstance(after.get("schemas"), list) or before.get("schemas") != after["schemas"]
            or not all(_canonical(resource, key) for key in changed)):
        return normalise_resource(resource, after, limits)
    fresh = normalise_resource(resource, {"schemas": after["schemas"], **{key: after[key] for key in changed}}, limits)
    out: dict[str, Any] = {}
    for key, value in after.items():
        if key == "schemas":
            continue
        if key not in changed:
            out[key] = value
        elif key in fresh:
            out[key] = fresh[key]  # else normalised away (emptied, read-only)
    out["schemas"] = declared_schemas(resource, out)
    check_document_size(out, limits)
    return out


def _canonical(resource: ResourceSchema, key: str) -> bool:
    """The key is stored under its own name: the schema's spelling, an extension's id, or an unknown attribute."""
    lowered = key.lower()
    if lowered in _READ_ONLY_TOP or lowered in LEGACY_ENTERPRISE_SCHEMAS:
        return False
    ext = resource.is_extension(key)
    if ext is not None:
        return ext.id == key
    attr = resource.core.attr(key)
    return attr is None or attr.name == key


def coerce_ext_value(attr: Attr, value: Any, where: str) -> Any:
    """Extension attributes; Entra sends `manager` as a plain id string."""
    if attr.name == "manager" and isinstance(value, str):
        return {"value": value} if value else None
    if attr.name == "manager" and isinstance(value, dict) and "managerId" in value and "value" not in value:
        # OneLogin's SCIM 1.1 enterprise template: {"managerId": id} (RFC 7643 calls it "value").
        value = {("value" if k == "managerId" else k): v for k, v in value.items()}
    if attr.name == "manager" and isinstance(value, dict) and value.get("value") in ("", None):
        return None
    return coerce_value(attr, value, where)


def declared_schemas(resource: ResourceSchema, data: dict[str, Any]) -> list[str]:
    """The `schemas` of a stored resource: its core schema and the extensions it carries."""
    schemas = [resource.core.id]
    schemas.extend(ext.id for ext in resource.extensions if data.get(ext.id))
    return schemas


