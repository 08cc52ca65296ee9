"""Request limits: body size (413) and the optional per-tenant rate (429 with Retry-After)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from api.app import Services, create_app
from models.settings import Settings
from models.tables import ScimUser
from tests.api.helpers import asgi_client

USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def _app(base_settings, engine, **overrides):
    settings = dataclasses.replace(base_settings, **overrides)
    services = Services.from_settings(settings)
    services.engine.dispose()
    services.engine = engine
    return create_app(settings, services)


def test_a_body_over_the_limit_is_413_and_stores_nothing(tenant, engine):
    """Given the default 2 MiB limit (advertised as bulk.maxPayloadSize),
    when a 3 MiB user is posted, then the answer is a SCIM 413 and no row is written."""
    config = tenant.client.get("/ServiceProviderConfig").json()
    limit = config["bulk"]["maxPayloadSize"]
    body = b'{"schemas":["%s"],"userName":"big","title":"' % USER.encode() + b"x" * (limit + 1024) + b'"}'
    response = tenant.client.post("/Users", content=body)
    assert response.status_code == 413
    assert response.json()["status"] == "413"
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(ScimUser)).scalar() == 0


def test_the_rate_limit_answers_429_with_retry_after(base_settings, engine, tenant):
    """Given SCIM_RATE_LIMIT=5, when one token sends 12 requests within a second,
    then some are answered 429 with Retry-After and a SCIM error body, and another token is not affected."""
    app = _app(base_settings, engine, scim_rate_limit=5)

    async def burst(token: str, n: int) -> list[httpx.Response]:
        async with asgi_client(app, tenant.tenant_url) as client:
            headers = {"Authorization": f"Bearer {token}"}
            return [await client.get("/Users", params={"count": 1}, headers=headers) for _ in range(n)]

    async def both() -> tuple[list[httpx.Response], list[httpx.Response]]:
        return await burst(tenant.token, 12), await burst("not-a-token", 3)

    answers, strangers = asyncio.run(both())
    limited = [r for r in answers if r.status_code == 429]
    assert limited, [r.status_code for r in answers]
    assert all(r.headers["Retry-After"] == "1" for r in limited)
    assert limited[0].json()["status"] == "429"
    assert {r.status_code for r in answers} <= {200, 429}
    # A stranger's garbage token has a bucket of its own: it cannot throttle the IdP.
    assert [r.status_code for r in strangers] == [401, 401, 401]


def test_the_default_rate_limit_is_200_per_second_and_lets_an_idp_cycle_through(base_settings, engine, tenant):
    """Given the default settings (SCIM_RATE_LIMIT unset: 200 requests/s per token, issue 8),
    when 150 requests arrive back to back, then none is a 429."""
    defaults = Settings.from_env({})
    assert (defaults.scim_rate_limit, defaults.scim_auth_failure_limit) == (200, 30)
    app = _app(base_settings, engine, scim_rate_limit=defaults.scim_rate_limit)

    async def burst() -> set[int]:
        async with asgi_client(app, tenant.tenant_url) as client:
            headers = {"Authorization": f"Bearer {tenant.token}"}
            return {(await client.get("/Users", params={"count": 1}, headers=headers)).status_code for _ in range(150)}

    assert asyncio.run(burst()) == {200}


def test_a_wrong_token_is_401_before_the_body_is_read(live_server, tenant):
    """Given a request that declares a 1 MiB body but sends only its first bytes,
    when its token is wrong, then the answer is a SCIM 401 at once: the server never waited for the body."""
    host, port = "127.0.0.1", live_server.settings.port
    path = httpx.URL(tenant.tenant_url + "/Users").raw_path.decode()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer not-the-token\r\n"
            f"Content-Type: application/scim+json\r\nContent-Length: {1024 * 1024}\r\n\r\n".encode()
            + b'{"schemas": ['
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)  # times out (fails) if the server waits for the rest of the body
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_a_right_token_still_reads_the_body(live_server, tenant):
    """Given the same half-sent body with the tenant's own token, the server waits for the body
    (it is read only once the token is known good), and answers once the body is complete."""
    host, port = "127.0.0.1", live_server.settings.port
    path = httpx.URL(tenant.tenant_url + "/Users").raw_path.decode()
    body = b'{"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "half@example.com"}'
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {tenant.token}\r\n"
            f"Content-Type: application/scim+json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10]
        )
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
        sock.settimeout(5)
        sock.sendall(body[10:])
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]


def test_failed_authentications_are_throttled_per_address(base_settings, engine, tenant):
    """Given SCIM_AUTH_FAILURE_LIMIT=3, when one address sends five wrong tokens within a minute,
    then three are 401 and the rest 429 with Retry-After and a SCIM error body;
    the tenant's own token from the same address still works, and nothing was written."""
    settings = dataclasses.replace(base_settings, redis_namespace=base_settings.redis_namespace + f"af{uuid.uuid4().hex[:6]}")
    app = _app(settings, engine, scim_auth_failure_limit=3)

    async def run() -> tuple[list[httpx.Response], httpx.Response]:
        async with asgi_client(app, tenant.tenant_url) as client:
            wrong = [await client.post("/Users", json={"schemas": [USER], "userName": f"x{i}@example.com"},
                                       headers={"Authorization": f"Bearer wrong-{i}"}) for i in range(5)]
            right = await client.get("/Users", headers={"Authorization": f"Bearer {tenant.token}"})
            return wrong, right

    wrong, right = asyncio.run(run())
    assert [r.status_code for r in wrong] == [401, 401, 401, 429, 429]
    assert 1 <= int(wrong[-1].headers["Retry-After"]) <= 60
    assert wrong[-1].json()["status"] == "429"
    assert right.status_code == 200
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(ScimUser)).scalar() == 0
