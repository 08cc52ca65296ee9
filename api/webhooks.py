"""POST /stripe/webhook: Stripe's events, signature checked, stored once, applied without calling Stripe."""

from __future__ import annotations

import logging
from typing import Any, Callable

import orjson
import stripe
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from billing.ledger import EventOutcome, InvalidStripeEventError, store_event
from models.db import session_scope
from models.settings import Settings

log = logging.getLogger(__name__)

# Stripe's events are a few KiB; a subscription with many items stays far below this.
MAX_EVENT_BYTES = 512 * 1024
# Stripe's own default: a signature older than this is a replay, not a delivery.
SIGNATURE_TOLERANCE_SECONDS = 300


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


class StripeWebhooks:
    """Verifies Stripe-Signature with STRIPE_WEBHOOK_SECRET; 400 and nothing changed otherwise."""

    def __init__(self, settings: Settings, engine: Engine, wake: Callable[[str], Any]) -> None:
        self.secret = settings.stripe_webhook_secret
        self.engine = engine
        self.wake = wake

    def routes(self) -> list[Route]:
        return [Route("/stripe/webhook", self.receive, methods=["POST"])]

    async def receive(self, request: Request) -> Response:
        """Verify, store once, apply; wake the tenant whose seats must be re-read."""
        if not self.secret:
            return _error(400, "webhooks_disabled", "STRIPE_WEBHOOK_SECRET is not set on this server.")
        raw = await request.body()
        if len(raw) > MAX_EVENT_BYTES:
            return _error(413, "too_large", f"A Stripe event is at most {MAX_EVENT_BYTES} bytes.")
        try:
            payload = raw.decode("utf-8")
            # The library's own check: HMAC-SHA256 over "t.payload", constant-time
            # compare, and the timestamp within the tolerance (a replayed old delivery fails).
            stripe.WebhookSignature.verify_header(
                payload, request.headers.get("stripe-signature"), self.secret, SIGNATURE_TOLERANCE_SECONDS
            )
        except (UnicodeDecodeError, stripe.SignatureVerificationError):
            return _error(400, "bad_signature", "The Stripe-Signature header is missing or does not match.")
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "invalid_event", "The body is not valid JSON.")
        try:
            outcome = await run_in_threadpool(self._store, event)
        except InvalidStripeEventError as error:
            return _error(400, "invalid_event", str(error))
        if outcome.tenant_id and outcome.outcome == "seats re-read requested":
            await run_in_threadpool(self.wake, outcome.tenant_id)
        log.info("stripe event %s: %s", event.get("id"), outcome.outcome)
        return JSONResponse({"received": True, "duplicate": outcome.duplicate, "outcome": outcome.outcome})

    def _store(self, event: Any) -> EventOutcome:
        with session_scope(self.engine) as session:
            return store_event(session, event)
