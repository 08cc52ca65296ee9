"""Request limits: body size (413) and the optional per-tenant rate (429 with Retry-After)."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
from sqlalchemy import func, select

from api.app import Services, create_app
from models.tables import ScimUser

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
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=tenant.tenant_url) as client:
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


def test_the_default_never_throttles_a_burst(tenant):
    """Given the default settings (no rate limit), when 200 requests arrive back to back, none is a 429."""
    statuses = {tenant.client.get("/Users", params={"count": 1}).status_code for _ in range(200)}
    assert statuses == {200}
