"""tests/idp: replayed IdP traffic must never make the server answer 500.

The guard is the idea of tests/api/conftest.py, kept here so that this folder
stands on its own: every test of tests/idp fails if the app logged a crash, even when the test
itself only looked at a status it expected. It listens on the "api" logger, the
parent of every place that answers a 500 and logs it (api/app.py `on_crash`,
api/scim/http.py `contained`, api/admin.py).
"""

from __future__ import annotations

import logging
from typing import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.conftest import TABLES

# The parent logger of every module that logs the unexpected errors it answers with a 500.
_CRASH_LOGGER = "api"


class _Crashes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_server_errors() -> Iterator[None]:
    """No test in this folder may make the server answer 500 (STYLE.md "Errors")."""
    handler = _Crashes()
    logger = logging.getLogger(_CRASH_LOGGER)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, f"the server answered 500: {handler.records[0].getMessage()}"


@pytest.fixture
def clean_db(engine: Engine) -> Engine:
    """Every test starts with empty tables; DELETE (children first), which on these small
    tables costs ~1 ms where PostgreSQL's TRUNCATE of ten tables costs ~50 ms."""
    with engine.begin() as connection:
        for table in TABLES:
            connection.execute(text(f"DELETE FROM {table}"))
    return engine
