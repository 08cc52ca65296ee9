"""/ServiceProviderConfig, /ResourceTypes and /Schemas (RFC 7644 §4), consistent with what we support."""

from __future__ import annotations

from typing import Any

from api.scim.bulk import MAX_OPERATIONS
from api.scim.errors import NotFoundError
from api.scim.query import MAX_RESULTS
from api.scim.schema import ALL_SCHEMAS, GROUP_RESOURCE, USER_RESOURCE, ResourceSchema

SPC_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
RESOURCE_TYPE_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ResourceType"


def service_provider_config(base_url: str, max_body_bytes: int) -> dict[str, Any]:
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


def schemas(base_url: str) -> list[dict[str, Any]]:
    return [s.to_json(base_url) for s in ALL_SCHEMAS]


def one_schema(base_url: str, schema_id: str) -> dict[str, Any]:
    for schema in ALL_SCHEMAS:
        if schema.id == schema_id:
            return schema.to_json(base_url)
    raise NotFoundError(f"Schema '{schema_id}' not found.")
