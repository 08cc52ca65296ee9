"""The hot routes (POST /Users, PATCH /Groups/{id} around Starlette) match exactly what the router would."""

from __future__ import annotations

import pytest
from starlette.routing import Match

from api.app import HotRoutes
from tests.conftest import LiveServer

MATCHED = [
    ("POST", "/scim/v2/t1/Users", "/scim/v2/{tenant_id}/Users", {"tenant_id": "t1"}),
    ("PATCH", "/scim/v2/t1/Groups/g1", "/scim/v2/{tenant_id}/Groups/{id}", {"tenant_id": "t1", "id": "g1"}),
    # PATCH is not a method of the /Groups/.search route: the router, too, ends at /Groups/{id}.
    ("PATCH", "/scim/v2/t1/Groups/.search", "/scim/v2/{tenant_id}/Groups/{id}", {"tenant_id": "t1", "id": ".search"}),
    ("POST", "/scim/v2/caf\u00e9 t/Users", "/scim/v2/{tenant_id}/Users", {"tenant_id": "caf\u00e9 t"}),
]
NOT_MATCHED = [
    ("POST", "/scim/v2/t1/Users/"),
    ("POST", "/scim/v2//Users"),
    ("POST", "/scim/v2/t1/Users/.search"),
    ("POST", "/scim/v1/t1/Users"),
    ("POST", "/admin/v2/t1/Users"),
    ("GET", "/scim/v2/t1/Users"),
    ("PUT", "/scim/v2/t1/Groups/g1"),
    ("PATCH", "/scim/v2/t1/Groups/"),
    ("PATCH", "/scim/v2/t1/Groups/g1/members"),
    ("PATCH", "/scim/v2/t1/Users/u1"),
    ("POST", "/scim/v2/t1/Groups"),
]


@pytest.fixture
def hot(live_server: LiveServer) -> HotRoutes:
    if not isinstance(live_server.app, HotRoutes):
        pytest.skip("the hot routes serve PostgreSQL only")
    return live_server.app


def _router_match(hot: HotRoutes, method: str, path: str) -> tuple[str, dict[str, str]] | None:
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    for route in hot.app.router.routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return route.path, child["path_params"]
    return None


@pytest.mark.parametrize(("method", "path", "template", "params"), MATCHED)
def test_hot_route_is_the_routers_route(hot: HotRoutes, method: str, path: str, template: str,
                                        params: dict[str, str]) -> None:
    found = hot.scim.hot_route(method, path)
    assert found is not None
    assert found[:2] == (template, params)
    assert _router_match(hot, method, path) == (template, params)


@pytest.mark.parametrize(("method", "path"), NOT_MATCHED)
def test_everything_else_goes_to_the_app(hot: HotRoutes, method: str, path: str) -> None:
    assert hot.scim.hot_route(method, path) is None
