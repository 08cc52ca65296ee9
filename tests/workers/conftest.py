"""Fixtures shared by the worker tests: a real SMTP server and a mailer talking to it."""

from __future__ import annotations

import pytest

from tests.fakes.smtp_server import FakeSmtp
from workers.mail.transport import SmtpMailer


@pytest.fixture
def smtp():
    with FakeSmtp() as server:
        yield server


@pytest.fixture
def mailer(smtp):
    with SmtpMailer(smtp.url, timeout=5, attempts=3, wait_seconds=0.01) as mailer:
        yield mailer
