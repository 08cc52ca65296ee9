"""The Dramatiq actors. Import only after the broker is set (workers.broker.setup_worker_broker)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import dramatiq
import redis
from dramatiq.middleware import CurrentMessage

from billing.purchasing import PurchaseRunner
from billing.purchasing import sync_seats as sync_seats_from_stripe
from billing.stripe_gateway import BillingError, PermanentBillingError
from models.tables import utcnow
from workers import invitations, quarantine, runtime
from workers.deadletters import safe_reason
from workers.names import (
    GIVE_UP_INVITATIONS,
    INVITE_QUEUE,
    LAST_ERROR,
    OPERATOR_RETRY,
    OWNED_IDS,
    PURCHASE_QUEUE,
    PURCHASE_SEATS,
    RECONCILE_QUEUE,
    RECONCILE_TENANT,
    SEND_INVITATION,
    SYNC_SEATS,
)
from workers.reconcile import Reconciler
from workers.wakeup import pending_key

log = logging.getLogger(__name__)

# Backoff in milliseconds: seconds, not Dramatiq's default of up to days.
RECONCILE_RETRIES = 20
PURCHASE_RETRIES = 12
INVITE_RETRIES = 8
BUSY_RETRY_MS = 250


@contextmanager
def _failures_counted(rt: runtime.Runtime, actor: str) -> Iterator[None]:
    """Count a failed job (and a Stripe fault, when Stripe caused it); the error still propagates."""
    try:
        yield
    except PermanentBillingError as error:
        rt.telemetry.job(actor, "error")
        if error.is_auth:
            # Our STRIPE_API_KEY was refused: the operator must act (log, metric, /readyz),
            # the tenant did nothing wrong and is not blocked; the job is retried.
            log.error("Stripe refused the API key (HTTP %s): %s", error.status, error.reason)
            rt.telemetry.stripe_auth_failed(error.reason)
        else:
            rt.telemetry.stripe("transient_error")
        raise
    except BillingError:
        rt.telemetry.job(actor, "error")
        rt.telemetry.stripe("transient_error")
        raise
    except Exception:
        rt.telemetry.job(actor, "error")
        raise


def send_purchase(rt: runtime.Runtime, purchase_id: str, *, coalesce: bool = True) -> None:
    """Enqueue a purchase job; a new plan waits STRIPE_UPDATE_SPACING first, so demand arriving
    meanwhile is frozen into the same request (the freeze re-reads the demand)."""
    delay = int(rt.settings.stripe_update_spacing * 1000) if coalesce else 0
    purchase_seats.send_with_options(args=(purchase_id,), delay=delay or None)


def _pace(rt: runtime.Runtime, subscription_id: str, request_key: str) -> float:
    """Seconds until this subscription may get another update (0: now, and the slot is taken).

    A retry of the request that holds the slot (same idempotency key) is no new
    update for Stripe, so it goes at once.
    """
    spacing_ms = int(rt.settings.stripe_update_spacing * 1000)
    if spacing_ms <= 0:
        return 0.0
    key = f"{rt.settings.redis_namespace}:stripe-pace:{subscription_id}"
    try:
        if rt.redis.set(key, request_key, nx=True, px=spacing_ms):
            return 0.0
        holder = rt.redis.get(key)
        if holder is not None and holder.decode() == request_key:
            return 0.0
        return max(0.05, int(rt.redis.pttl(key)) / 1000)
    except (redis.RedisError, OSError):
        return 0.0  # Pacing is a courtesy to Stripe; without Redis, Stripe's 429 still paces us.


@dramatiq.actor(
    actor_name=RECONCILE_TENANT, queue_name=RECONCILE_QUEUE,
    max_retries=RECONCILE_RETRIES, min_backoff=500, max_backoff=15_000,
    # A failure that quarantines the tenant ends the message's retries.
    throws=(quarantine.TenantQuarantined,),
)
def reconcile_tenant(tenant_id: str) -> None:
    """Apply a tenant's unapplied events; then send the purchase and invitations it planned."""
    rt = runtime.current()

    def clear_pending() -> None:
        # Cleared under the lock and before the events are read: a write committed
        # after this point sets the flag again and sends a new message, so none is lost.
        rt.redis.delete(pending_key(rt.settings.redis_namespace, tenant_id))

    health = quarantine.health(rt.engine, tenant_id)
    if health.quarantined(utcnow()):
        # A poison tenant waits out its backoff; the sweep sends it again after.
        rt.telemetry.job(RECONCILE_TENANT, "quarantined")
        return
    try:
        reconciler = Reconciler(rt.engine, rt.gateway, settings=rt.settings)
        result = reconciler.run(tenant_id, on_locked=clear_pending)
    except Exception as error:
        rt.telemetry.job(RECONCILE_TENANT, "error")
        if quarantine.counts_as_poison(error):
            policy = quarantine.QuarantinePolicy.from_settings(rt.settings)
            until = quarantine.record_failure(rt.engine, tenant_id, error, policy, utcnow())
            if until is not None:
                raise quarantine.TenantQuarantined(tenant_id, until, safe_reason(error)) from error
        raise
    if health.failures and not result.busy:
        quarantine.clear(rt.engine, tenant_id)
    if result.busy:
        # Another worker is reconciling this tenant; the flag stays set, so writes
        # meanwhile send nothing more and this one message comes back for them.
        rt.telemetry.job(RECONCILE_TENANT, "busy")
        reconcile_tenant.send_with_options(args=(tenant_id,), delay=BUSY_RETRY_MS)
        return
    rt.telemetry.job(RECONCILE_TENANT, "ok")
    if result.purchase_id:
        send_purchase(rt, result.purchase_id)
    if result.needs_seat_sync:
        sync_seats.send(tenant_id)
    for batch in invitations.batches(result.invitation_ids, spread=rt.settings.worker_threads):
        send_invitation.send(*batch)
    if result.more:
        rt.waker.send(tenant_id)


@dramatiq.actor(
    actor_name=PURCHASE_SEATS, queue_name=PURCHASE_QUEUE,
    max_retries=PURCHASE_RETRIES, min_backoff=1_000, max_backoff=60_000,
)
def purchase_seats(purchase_id: str) -> None:
    """Run one purchase through the protocol (frozen body and key, Stripe, settle)."""
    rt = runtime.current()
    runner = PurchaseRunner(rt.engine, rt.gateway, pace=lambda subscription, key: _pace(rt, subscription, key),
                            lease=timedelta(seconds=rt.settings.purchase_lease))
    with _failures_counted(rt, PURCHASE_SEATS):
        outcome = runner.run(purchase_id)
    rt.telemetry.job(PURCHASE_SEATS, outcome.status)
    if outcome.stripe_called:
        rt.telemetry.stripe("failed" if outcome.status == "failed" else "ok")
        rt.telemetry.stripe_ok()
    if outcome.retry_in is not None:
        purchase_seats.send_with_options(args=(purchase_id,), delay=max(1, int(outcome.retry_in * 1000)))
    if outcome.next_purchase_id:
        send_purchase(rt, outcome.next_purchase_id)


@dramatiq.actor(
    actor_name=SYNC_SEATS, queue_name=PURCHASE_QUEUE,
    max_retries=PURCHASE_RETRIES, min_backoff=1_000, max_backoff=60_000,
)
def sync_seats(tenant_id: str) -> None:
    """Read the seats bought from the tenant's Stripe subscription, then allocate."""
    rt = runtime.current()
    with _failures_counted(rt, SYNC_SEATS):
        allocation = sync_seats_from_stripe(rt.engine, rt.gateway, tenant_id)
    rt.telemetry.job(SYNC_SEATS, "ok")
    if allocation is not None:  # None: the seats were known already, Stripe was not called
        rt.telemetry.stripe("ok")
        rt.telemetry.stripe_ok()
    if allocation is not None and allocation.purchase_id:
        send_purchase(rt, allocation.purchase_id)


# A send_invitation message owns its ids until each is settled. An attempt that fails keeps in the
# message's options (which Dramatiq's retries carry along) only the ids it gave back for the retry, and
# why: ids sent, refused for good, waiting for their day, being sent by another message or postponed
# into a new message are no longer this message's. So the retry sends only those, and when the retries
# are spent, give_up_invitations (Dramatiq's on_retry_exhausted) fails only those.


@dramatiq.actor(
    actor_name=GIVE_UP_INVITATIONS, queue_name=INVITE_QUEUE,
    max_retries=INVITE_RETRIES, min_backoff=1_000, max_backoff=60_000,
)
def give_up_invitations(message_data: dict[str, Any], retry_info: dict[str, Any]) -> None:
    """Dramatiq gave up a send_invitation message: its own ids, still pending, become failed with the reason."""
    rt = runtime.current()
    options = message_data.get("options") or {}
    # A message from before narrowing owns all its args.
    ids = options[OWNED_IDS] if OWNED_IDS in options else message_data.get("args") or []
    attempts = int(retry_info.get("retries", INVITE_RETRIES)) + 1
    reason = options.get(LAST_ERROR) or "unknown error"
    given_up = invitations.give_up(rt.engine, ids, f"gave up after {attempts} attempts: {reason}")
    if given_up:
        rt.telemetry.job(SEND_INVITATION, "given_up", len(given_up))


@dramatiq.actor(
    actor_name=SEND_INVITATION, queue_name=INVITE_QUEUE,
    max_retries=INVITE_RETRIES, min_backoff=1_000, max_backoff=60_000,
    on_retry_exhausted=GIVE_UP_INVITATIONS,
)
def send_invitation(*invitation_ids: str) -> None:
    """Claim, send (stable Message-ID) and record a batch of invitations; after the last retry the error is on the rows.

    Messages from before batching carry one id; they are a batch of one.
    """
    rt = runtime.current()
    message = CurrentMessage.get_current_message()
    narrowed = message is not None and OWNED_IDS in message.options
    owned = list(message.options[OWNED_IDS] if narrowed else invitation_ids)  # type: ignore[union-attr]
    if message is not None and message.options.pop(OPERATOR_RETRY, False):
        # `sally-scim jobs retry`: the rows this message's give-up failed are to be tried again.
        invitations.reopen(rt.engine, owned)
    try:
        result = invitations.send_invitations(rt.engine, rt.mailer, rt.settings, owned)
    except Exception as error:
        # The database (or a bug), not the mail server: nothing says which rows were sent, so the
        # message keeps every id it owned (give_up fails only rows still pending, never a sent one).
        rt.telemetry.job(SEND_INVITATION, "error")
        _keep_for_retry(message, owned, error)
        raise
    # One count per invitation and outcome: sent, failed, already_done,
    # claimed_elsewhere, retry (Dramatiq retries the job), postponed, waiting.
    for outcome, count in result.counts().items():
        rt.telemetry.job(SEND_INVITATION, outcome, count)
    postponed = result.ids("postponed")
    if postponed:
        # A slow mail server: the rows the claim's time budget did not cover, as a new job.
        send_invitation.send(*postponed)
    if result.error is not None:
        # And one "error" per failed job, as for the other actors.
        rt.telemetry.job(SEND_INVITATION, "error")
        _keep_for_retry(message, result.ids("retry"), result.error)
        raise result.error


def _keep_for_retry(message: Any, invitation_ids: list[str], error: Exception) -> None:
    """Narrow the failing message to the ids it still owns, with the reason its give-up will show."""
    if message is None:
        return
    message.options[OWNED_IDS] = list(invitation_ids)
    # The reason, never str(error): a database error could carry SQL and addresses.
    message.options[LAST_ERROR] = getattr(error, "reason", None) or type(error).__name__
