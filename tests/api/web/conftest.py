"""Fixtures shared by the admin page's tests: the real app under Starlette's TestClient, signed out or in."""

from __future__ import annotations

import re
from typing import Iterator

import pytest
from starlette.testclient import TestClient

from api.app import Services, create_app
from tests.conftest import ADMIN_TOKEN

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def make_client(settings, engine, *, redis_url: str | None = None,
                client: tuple[str, int] = ("testclient", 50000)) -> TestClient:
    """The real app (no broker; Redis only when given) for a browser at the ``client`` address."""
    services = Services(engine, wake=lambda _tenant: None, ping_broker=lambda: True, redis_url=redis_url)
    return TestClient(create_app(settings, services), base_url="http://testserver", follow_redirects=False,
                      client=client)


@pytest.fixture
def page(base_settings, clean_db) -> Iterator[TestClient]:
    with make_client(base_settings, clean_db) as client:
        yield client


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def sign_in(client: TestClient) -> str:
    """Sign in with the admin token; returns the signed-in session's CSRF token."""
    response = client.post("/login", data={"token": ADMIN_TOKEN, "csrf": csrf_of(client.get("/").text)})
    assert response.status_code == 303 and response.headers["location"] == "/"
    return csrf_of(client.get("/").text)


@pytest.fixture
def signed_in(base_settings, clean_db):
    with make_client(base_settings, clean_db) as client:
        csrf = sign_in(client)
        yield client, csrf
