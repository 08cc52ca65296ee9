"""The PostgreSQL hot path's own failure mode (models/directory/hotpath.py)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from api.scim.errors import from_directory
from models.directory.errors import UnavailableError
from models.directory.hotpath import AsyncDatabase


def test_an_unreachable_database_is_a_503_with_retry_after_not_a_hang():
    """Given the hot path's pool pointed at a port where no PostgreSQL listens,
    when a token is looked up, then the directory refuses within the checkout timeout,
    and the SCIM answer for that is a 503 with Retry-After."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before use: nothing listens there
    database = AsyncDatabase(f"postgresql://postgres@127.0.0.1:{port}/nothing", checkout_timeout=0.5)

    async def lookup() -> None:
        try:
            await database.tenant_of("0" * 64)
        finally:
            await database.close()

    started = time.monotonic()
    with pytest.raises(UnavailableError) as refused:
        asyncio.run(lookup())
    assert time.monotonic() - started < 5
    answer = from_directory(refused.value)
    assert answer.status == 503 and answer.headers == {"Retry-After": "2"}
