"""/ServiceProviderConfig, /ResourceTypes and /Schemas (RFC 7644 §4), consistent with what we support."""

from __future__ import annotations

from typing import Any

from api.scim.bulk import MAX_OPERATIONS
from api.scim.errors import NotFoundError
from api.scim.query import MAX_RESULTS
from api.scim.schema import ALL_SCHEMAS, GROUP_RESOURCE, GROUP_SCHEMA, USER_RESOURCE, ResourceSchema, Schema
from models.settings import ScimLimits

SPC_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
RESOURCE_TYPE_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ResourceType"


def service_provider_config(base_url: str, max_body_bytes: int) -> dict[str, Any]:
    """RFC 7643 §5, exactly its attributes (strict clients refuse others, even an extension);
    the caps it has no room for are in the /Schemas descriptions (see `schemas`)."""
    return {
        "schemas": [SPC_SCHEMA],
        "documentationUri": "https://sally.example/help/scim",
        "patch": {"supported": True},
        "bulk": {"supported": True, "maxOperations": MAX_OPERATIONS, "maxPayloadSize": max_body_bytes},
        "filter": {"supported": True, "maxResults": MAX_RESULTS},
        "changePassword": {"supported": False},
        "sort": {"supported": True},
        "etag": {"supported": True},
        "authenticationSchemes": [
            {
                "type": "oauthbearertoken",
                "name": "OAuth Bearer Token",
                "description": "The Token shown once when SCIM is set up in Sally.",
                "primary": True,
            }
        ],
        "meta": {"resourceType": "ServiceProviderConfig", "location": f"{base_url}/ServiceProviderConfig"},
    }


def resource_type(resource: ResourceSchema, base_url: str) -> dict[str, Any]:
    return {
        "schemas": [RESOURCE_TYPE_SCHEMA],
        "id": resource.name,
        "name": resource.name,
        "endpoint": resource.endpoint,
        "description": f"{resource.name} resources",
        "schema": resource.core.id,
        "schemaExtensions": [{"schema": ext.id, "required": False} for ext in resource.extensions],
        "meta": {"resourceType": "ResourceType", "location": f"{base_url}/ResourceTypes/{resource.name}"},
    }


RESOURCES = (USER_RESOURCE, GROUP_RESOURCE)


def resource_types(base_url: str) -> list[dict[str, Any]]:
    return [resource_type(r, base_url) for r in RESOURCES]


def one_resource_type(base_url: str, name: str) -> dict[str, Any]:
    for resource in RESOURCES:
        if resource.name == name:
            return resource_type(resource, base_url)
    raise NotFoundError(f"ResourceType '{name}' not found.")


def limits_text(limits: ScimLimits, max_body_bytes: int) -> str:
    """Every per-request cap in one sentence, for the schema descriptions (RFC 7643 §7 "description")."""
    return (
        f"Limits per request: body {max_body_bytes} bytes and stored resource {limits.max_document_bytes} bytes "
        f"of JSON (413); {limits.max_patch_operations} PATCH operations, {limits.max_values} values per "
        f"multi-valued attribute, {limits.max_members} group members (400 invalidValue); "
        f"{limits.max_attribute_names} names in attributes or excludedAttributes, filters of "
        f"{limits.max_filter_length} characters and {limits.max_filter_terms} comparisons, "
        f"{limits.max_filter_candidates} resources checked for a filter on attributes without an index "
        "(400 tooMany)."
    )


def _described(schema: Schema, base_url: str, limits: ScimLimits, max_body_bytes: int) -> dict[str, Any]:
    out = schema.to_json(base_url)
    out["description"] = f"{out['description'].rstrip('.')}. {limits_text(limits, max_body_bytes)}"
    for attr in out["attributes"]:
        if not attr["multiValued"]:
            continue
        if schema.id == GROUP_SCHEMA and attr["name"] == "members":
            cap = f"At most {limits.max_members} members per POST, PUT or PATCH."
        else:
            cap = f"At most {limits.max_values} values."
        attr["description"] = f"{attr['description'].rstrip('.')}. {cap}"
    return out


def schemas(base_url: str, limits: ScimLimits, max_body_bytes: int) -> list[dict[str, Any]]:
    """/Schemas, with this deployment's caps in the descriptions."""
    return [_described(s, base_url, limits, max_body_bytes) for s in ALL_SCHEMAS]


def one_schema(base_url: str, schema_id: str, limits: ScimLimits, max_body_bytes: int) -> dict[str, Any]:
    for schema in ALL_SCHEMAS:
        if schema.id == schema_id:
            return _described(schema, base_url, limits, max_body_bytes)
    raise NotFoundError(f"Schema '{schema_id}' not found.")
