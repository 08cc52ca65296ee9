"""Shared request builders and assertions for the SCIM and admin API tests."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.conftest import SSL_CONTEXT

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_SCHEMA = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
LIST_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:ListResponse"

# One CA bundle load for every test client (httpx loads it per client otherwise).

# The tables a SCIM request may write to.
DIRECTORY_TABLES = ("scim_user", "scim_group", "group_member", "sync_event")


def scim_client(url: str, token: str, **headers: str) -> httpx.Client:
    """A client on a Tenant URL with a bearer token (or other headers)."""
    all_headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json", **headers}
    return httpx.Client(base_url=url, headers=all_headers, timeout=60, verify=SSL_CONTEXT)


def plain_client(url: str, headers: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=url, headers=headers, timeout=30, verify=SSL_CONTEXT)


def user_body(user_name: str, **attributes: Any) -> dict[str, Any]:
    return {"schemas": [USER_SCHEMA], "userName": user_name, **attributes}


def group_body(display_name: str, members: list[str] | None = None, **attributes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"schemas": [GROUP_SCHEMA], "displayName": display_name, **attributes}
    if members is not None:
        body["members"] = [{"value": member_id} for member_id in members]
    return body


def patch_body(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


def create_user(client: httpx.Client, user_name: str, **attributes: Any) -> dict[str, Any]:
    response = client.post("/Users", json=user_body(user_name, **attributes))
    assert response.status_code == 201, response.text
    return response.json()


def create_users(client: httpx.Client, count: int, prefix: str = "user") -> list[str]:
    return [create_user(client, f"{prefix}{i}@example.com")["id"] for i in range(count)]


def create_group(client: httpx.Client, display_name: str, members: list[str] | None = None, **attributes: Any) -> dict[str, Any]:
    response = client.post("/Groups", json=group_body(display_name, members, **attributes))
    assert response.status_code == 201, response.text
    return response.json()


def member_ids(client: httpx.Client, group_id: str) -> set[str]:
    """The member ids a GET of the group shows (RFC 7643 §4.2)."""
    response = client.get(f"/Groups/{group_id}")
    assert response.status_code == 200, response.text
    return {member["value"] for member in response.json().get("members", [])}


def assert_scim_error(response: httpx.Response, status: int, scim_type: str | None = None) -> dict[str, Any]:
    """RFC 7644 §3.12: the error schema, `status` as a string, `scimType` where the RFC names one."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/scim+json"), response.headers
    body = response.json()
    assert body["schemas"] == [ERROR_SCHEMA], body
    assert body["status"] == str(status), body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    if scim_type is None:
        assert "scimType" not in body, body
    else:
        assert body.get("scimType") == scim_type, body
    return body


def assert_admin_error(response: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    """CONTRACT.md "Admin API": errors are {"error": code, "detail": text}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["detail"], str) and body["detail"], body
    if error is not None:
        assert body["error"] == error, body
    return body


def snapshot(engine: Engine, tables: tuple[str, ...] = DIRECTORY_TABLES) -> dict[str, list[tuple[str, ...]]]:
    """Every row of the directory tables, for "nothing changed" assertions."""
    out: dict[str, list[tuple[str, ...]]] = {}
    with engine.connect() as connection:
        for table in tables:
            rows = connection.execute(text(f"SELECT * FROM {table}")).all()
            out[table] = sorted(tuple(str(value) for value in row) for row in rows)
    return out


def count_rows(engine: Engine, table: str, where: str = "1=1", **params: Any) -> int:
    with engine.connect() as connection:
        return connection.execute(text(f"SELECT COUNT(*) FROM {table} WHERE {where}"), params).scalar_one()


def sync_counts(admin: httpx.Client, tenant_id: str) -> dict[str, Any]:
    response = admin.get(f"/tenants/{tenant_id}/sync")
    assert response.status_code == 200, response.text
    return response.json()


def events(engine: Engine, tenant_id: str) -> list[tuple[str, list[str] | None]]:
    """(kind, user_ids) of the tenant's sync events, oldest first."""
    import json

    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT kind, user_ids FROM sync_event WHERE tenant_id = :t ORDER BY id"), {"t": tenant_id}
        ).all()
    out = []
    for kind, user_ids in rows:
        if isinstance(user_ids, str):
            user_ids = json.loads(user_ids)
        out.append((kind, user_ids))
    return out


def list_all(client: httpx.Client, path: str, **params: Any) -> httpx.Response:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response


@asynccontextmanager
async def asgi_client(app: Any, base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app in process, with the app's lifespan run around it: its
    shutdown closes the SCIM hot path's async PostgreSQL pool in the loop that opened it
    (left open, asyncio.run's cancelling of the pool's tasks can hang for good)."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client:
            yield client
