"""The admin page's session: a signed cookie (HttpOnly, SameSite=Strict) holding a CSRF token and the sign-in."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

COOKIE = "sally_session"


@dataclass
class WebSession:
    """One browser's session: its CSRF token (one per session) and whether it signed in."""

    csrf: str
    signed_in: bool
    expires: int

    @classmethod
    def fresh(cls, lifetime: int, signed_in: bool = False) -> "WebSession":
        return cls(csrf=secrets.token_urlsafe(32), signed_in=signed_in, expires=int(time.time()) + lifetime)

    def csrf_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf.encode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Signs and checks the session cookie with a key derived from the admin token.

    Deriving the key from SALLY_ADMIN_TOKEN means every web process agrees on
    it with no extra setting, and rotating the admin token signs everyone out.
    """

    def __init__(self, admin_token: str | None, lifetime_seconds: int) -> None:
        secret = admin_token.encode() if admin_token else secrets.token_bytes(32)
        self._key = hmac.new(secret, b"sally-scim web session v1", hashlib.sha256).digest()
        self.lifetime = lifetime_seconds

    def __repr__(self) -> str:
        return f"SessionCodec(lifetime={self.lifetime})"

    def dumps(self, session: WebSession) -> str:
        payload = _b64(json.dumps({"c": session.csrf, "a": session.signed_in, "e": session.expires}).encode())
        signature = _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())
        return f"{payload}.{signature}"

    def loads(self, value: str | None) -> WebSession | None:
        """The session in a cookie value, or None if it is missing, forged or expired."""
        if not value or value.count(".") != 1 or len(value) > 4096:
            return None
        payload, signature = value.split(".")
        expected = _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        try:
            data: Any = json.loads(_unb64(payload))
            session = WebSession(csrf=str(data["c"]), signed_in=data["a"] is True, expires=int(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires < time.time() or not session.csrf:
            return None
        return session
