"""scim2-server's own ASGI app (in memory, no auth, no durability): the reference of bench/compare.py."""

from __future__ import annotations

import secrets

from scim2_models import ScimProvider
from scim2_server.applications.asgi import ASGIApplication
from scim2_server.memory import AsyncInMemoryStorage
from scim2_server.service import ScimService
from scim2_server.utils import (
    load_default_resource_types,
    load_default_schemas,
    load_default_service_provider_config,
)


def build() -> ASGIApplication:
    """The app as scim2-server's documentation builds it: default schemas, every feature on."""
    provider = ScimProvider.from_discovery(
        load_default_schemas().values(),
        load_default_resource_types().values(),
        config=load_default_service_provider_config(),
    )
    service = ScimService(provider, secret=secrets.token_urlsafe(32))
    return ASGIApplication(AsyncInMemoryStorage(), provider, service)


app = build()
