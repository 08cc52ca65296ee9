"""Health endpoints (CONTRACT.md "Health")."""

from __future__ import annotations

import httpx


def test_healthz_and_readyz_answer_when_the_database_and_broker_are_up(live_server):
    """Given the running web process with its database and Redis
    When a load balancer asks /healthz and /readyz
    Then both answer 200; /readyz says the database and the broker answer."""
    assert httpx.get(f"{live_server.url}/healthz").status_code == 200
    ready = httpx.get(f"{live_server.url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["database"] is True
    assert ready.json()["broker"] is True


def test_health_needs_no_token_and_leaks_no_tenant_data(live_server):
    """Given no credentials
    When /healthz is asked
    Then it answers 200 with a body that names no tenant or token."""
    response = httpx.get(f"{live_server.url}/healthz")
    assert response.status_code == 200
    assert "token" not in response.text.lower()
