"""A real SMTP server (aiosmtpd) on 127.0.0.1 that records what it accepts and fails on request."""

from __future__ import annotations

import email.policy
import threading
from collections import deque
from email import message_from_bytes
from email.message import EmailMessage

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from tests.fakes.ports import free_port

DROP = "drop"


class FakeSmtp:
    """A real SMTP server on 127.0.0.1 that records what it accepts and fails on request.

    ``fail_next(n, "421 ...")`` answers the next n messages with that reply (at
    DATA, or at RCPT); ``drop_next(n)`` hangs up instead of answering.
    ``connections`` counts SMTP sessions (one EHLO/HELO each).
    """

    def __init__(self, *, auth: bool = False) -> None:
        self.messages: list[EmailMessage] = []
        self.connections = 0
        self.rcpt_attempts = 0
        self.data_attempts = 0
        self.logins: list[tuple[bytes, bytes]] = []
        self._faults: deque[tuple[str, str]] = deque()
        self._lock = threading.Lock()
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        # AUTH over plain text is fine on 127.0.0.1 (aiosmtpd requires TLS for it by default).
        options = {"authenticator": self.authenticate, "auth_require_tls": False} if auth else {}
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **options)

    def __enter__(self) -> FakeSmtp:
        self._controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._controller.stop()

    def fail_next(self, count: int, reply: str, *, at: str = "DATA") -> None:
        with self._lock:
            self._faults.extend([(at, reply)] * count)

    def drop_next(self, count: int, *, at: str = "DATA") -> None:
        self.fail_next(count, DROP, at=at)

    def message_ids(self) -> list[str]:
        return [str(message["Message-ID"]) for message in self.messages]

    def _take(self, stage: str) -> str | None:
        with self._lock:
            if self._faults and self._faults[0][0] == stage:
                return self._faults.popleft()[1]
        return None

    @staticmethod
    def _answer(server, reply: str) -> str:
        if reply == DROP:
            server.transport.close()
        return reply

    # aiosmtpd handler hooks ------------------------------------------------------

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        with self._lock:
            self.connections += 1
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):
        session.host_name = hostname
        with self._lock:
            self.connections += 1
        return f"250 {server.hostname}"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpt_attempts += 1
        fault = self._take("RCPT")
        if fault:
            return self._answer(server, fault)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_attempts += 1
        fault = self._take("DATA")
        if fault:
            return self._answer(server, fault)
        self.messages.append(message_from_bytes(envelope.original_content, policy=email.policy.default))
        return "250 OK: queued"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        self.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cr@t:pw")
