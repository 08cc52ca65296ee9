"""The invitation protocol: claim the row, send outside any transaction, record — at least once, duplicate-safe.

DESIGN.md "Invitations are at-least-once, made duplicate-safe": the row is
claimed before sending and every (re)send carries the Message-ID derived from
tenant and user, so the only duplicate is a resend after a worker died between
the mail server's acceptance and the commit that records it (or after a send
that outlived CLAIM_LEASE). A receiving system that deduplicates on
Message-ID shows that duplicate once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal, Protocol

from sqlalchemy import and_, or_, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models.db import session_scope
from models.settings import Settings
from models.tables import Account, Invitation, ScimUser, Tenant, utcnow
from workers.mailer import PermanentMailError, TransientMailError, build_invitation

log = logging.getLogger(__name__)

Outcome = Literal["sent", "already_done", "claimed_elsewhere", "failed"]

# A "sending" claim older than this belongs to a worker that died: it may be re-claimed.
CLAIM_LEASE = timedelta(seconds=60)
# A pending invitation enqueued less than this long ago still has its message
# on the way (or a Dramatiq retry scheduled): the sweep leaves it alone.
ENQUEUE_GRACE = timedelta(seconds=60)
# Account.invite_error holds at most 1024 characters, Invitation.error 2048.
MAX_ERROR = 1024


class Mailer(Protocol):
    def send(self, msg) -> None: ...


@dataclass(frozen=True)
class _Claim:
    """What the claim transaction read: enough to build and send the mail without a transaction open."""

    invitation_id: str
    tenant_id: str
    user_id: str
    address: str | None
    message_id: str
    claimed_at: datetime
    tenant_name: str
    display_name: str | None


def send_invitation(
    engine: Engine,
    mailer: Mailer,
    settings: Settings,
    invitation_id: str,
    now: Callable[[], datetime] = utcnow,
) -> Outcome:
    """Claim, send and record one invitation; raises on a transient failure so the job is retried."""
    claim = _claim(engine, invitation_id, _utc(now()))
    if isinstance(claim, str):
        return claim

    if not claim.address:
        return _fail(engine, claim, "the user has no email address to invite", _utc(now()))
    try:
        msg = build_invitation(
            mail_from=settings.mail_from,
            to_address=claim.address,
            display_name=claim.display_name,
            tenant_name=claim.tenant_name,
            login_url=settings.public_base_url,
            message_id=claim.message_id,
        )
    except ValueError:
        return _fail(engine, claim, "the user's email address is not usable", _utc(now()))

    # No transaction is open while the mail server talks: a slow server must
    # not hold a database connection or (on SQLite) the write lock.
    try:
        mailer.send(msg)
    except PermanentMailError as error:
        log.warning("invitation %s refused for good (%s)", invitation_id, error.code or type(error).__name__)
        return _fail(engine, claim, error.reason, _utc(now()))
    except Exception as error:
        reason = error.reason if isinstance(error, TransientMailError) else f"unexpected {type(error).__name__}"
        _release(engine, claim, reason, _utc(now()))
        log.info("invitation %s not sent this time, released for a retry (%s)", invitation_id, type(error).__name__)
        raise
    # A crash from here to the commit below is the one resend window.
    _record_sent(engine, claim, _utc(now()))
    return "sent"


def give_up(engine: Engine, invitation_id: str, reason: str, now: Callable[[], datetime] = utcnow) -> bool:
    """Mark a pending invitation failed after the job's last retry, so the admin sees why; True if it did."""
    at = _utc(now())
    with session_scope(engine) as session:
        invitation = session.get(Invitation, invitation_id)
        # Only "pending": a row still "sending" may have been accepted by the
        # mail server; its lease expires and the sweep resends it instead.
        if invitation is None or invitation.status != "pending":
            return False
        full = f"{reason} (last error: {invitation.error})" if invitation.error else reason
        full = full[:MAX_ERROR]
        changed = session.execute(
            update(Invitation)
            .where(Invitation.id == invitation_id, Invitation.status == "pending")
            .values(status="failed", error=full, claimed_at=None)
        ).rowcount
        if changed:
            _set_account(session, invitation.user_id, at, invite_error=full)
    if changed:
        log.warning("invitation %s given up after its retries", invitation_id)
    return bool(changed)


def due_invitations(session: Session, now: datetime, limit: int = 1000) -> list[str]:
    """Ids the sweep should (re-)enqueue: pending without a recent enqueue, or sending with an expired lease."""
    now = _utc(now)
    not_recently_enqueued = or_(Invitation.enqueued_at.is_(None), Invitation.enqueued_at < now - ENQUEUE_GRACE)
    statement = (
        select(Invitation.id)
        .where(
            or_(
                Invitation.status == "pending",
                and_(Invitation.status == "sending", _lease_expired(now)),
            ),
            not_recently_enqueued,
        )
        .order_by(Invitation.created_at, Invitation.id)
        .limit(limit)
    )
    return list(session.execute(statement).scalars())


def mark_enqueued(session: Session, invitation_ids: Iterable[str], now: datetime) -> None:
    """Note that a message was (about to be) sent for these ids, so the next sweeps skip them for a while."""
    ids = list(invitation_ids)
    if ids:
        session.execute(
            update(Invitation)
            .where(Invitation.id.in_(ids), Invitation.status.in_(("pending", "sending")))
            .values(enqueued_at=_utc(now))
        )


# -- the steps ---------------------------------------------------------------------


def _lease_expired(now: datetime):
    return or_(Invitation.claimed_at.is_(None), Invitation.claimed_at < now - CLAIM_LEASE)


def _claim(engine: Engine, invitation_id: str, claimed_at: datetime) -> _Claim | Outcome:
    """Take the row with one conditional UPDATE; only the worker whose UPDATE matched may send."""
    with session_scope(engine) as session:
        taken = session.execute(
            update(Invitation)
            .where(
                Invitation.id == invitation_id,
                or_(
                    Invitation.status == "pending",
                    and_(Invitation.status == "sending", _lease_expired(claimed_at)),
                ),
            )
            .values(status="sending", claimed_at=claimed_at, attempts=Invitation.attempts + 1)
        ).rowcount
        invitation = session.get(Invitation, invitation_id)
        if invitation is None:
            log.warning("invitation %s does not exist; nothing to send", invitation_id)
            return "already_done"
        if not taken:
            if invitation.status in ("sent", "failed"):
                return "already_done"
            log.info("invitation %s is being sent by another worker", invitation_id)
            return "claimed_elsewhere"
        tenant = session.get(Tenant, invitation.tenant_id)
        user = session.get(ScimUser, invitation.user_id)
        return _Claim(
            invitation_id=invitation.id,
            tenant_id=invitation.tenant_id,
            user_id=invitation.user_id,
            address=invitation.address,
            message_id=invitation.message_id,
            claimed_at=claimed_at,
            tenant_name=tenant.name if tenant is not None else "",
            display_name=_display_name(user),
        )


def _record_sent(engine: Engine, claim: _Claim, sent_at: datetime) -> None:
    with session_scope(engine) as session:
        # Whoever holds the row now, the mail server accepted this message:
        # "sent" is the truth (the first recorded sent_at stays).
        recorded = session.execute(
            update(Invitation)
            .where(Invitation.id == claim.invitation_id, Invitation.status != "sent")
            .values(status="sent", sent_at=sent_at, error=None)
        ).rowcount
        if recorded:
            _set_account(session, claim.user_id, sent_at, invited_at=sent_at, invite_error=None)
    log.info("invitation %s sent", claim.invitation_id)


def _fail(engine: Engine, claim: _Claim, reason: str, at: datetime) -> Outcome:
    reason = reason[:MAX_ERROR]
    with session_scope(engine) as session:
        changed = session.execute(
            update(Invitation)
            .where(Invitation.id == claim.invitation_id, Invitation.status != "sent")
            .values(status="failed", error=reason)
        ).rowcount
        if changed:
            _set_account(session, claim.user_id, at, invite_error=reason)
    return "failed"


def _release(engine: Engine, claim: _Claim, reason: str, at: datetime) -> None:
    """Give the row back for the job's retry; only our own claim (a re-claim after our lease is not ours)."""
    with session_scope(engine) as session:
        session.execute(
            update(Invitation)
            .where(
                Invitation.id == claim.invitation_id,
                Invitation.status == "sending",
                Invitation.claimed_at == claim.claimed_at,
            )
            # enqueued_at: Dramatiq holds the retry; the sweep waits its grace before adding another.
            .values(status="pending", claimed_at=None, error=reason[:MAX_ERROR], enqueued_at=at)
        )


def _set_account(session: Session, user_id: str, at: datetime, **values: object) -> None:
    session.execute(update(Account).where(Account.user_id == user_id).values(updated_at=at, **values))


def _display_name(user: ScimUser | None) -> str | None:
    """displayName, else name.formatted, else given and family name (RFC 7643 §4.1.1)."""
    if user is None:
        return None
    if user.display_name:
        return user.display_name
    name = user.data.get("name") if isinstance(user.data, dict) else None
    if isinstance(name, dict):
        if isinstance(name.get("formatted"), str) and name["formatted"].strip():
            return name["formatted"]
        parts = [name.get(key) for key in ("givenName", "familyName")]
        joined = " ".join(part for part in parts if isinstance(part, str) and part.strip())
        if joined:
            return joined
    return None


def _utc(value: datetime) -> datetime:
    # SQLite stores the wall-clock digits only: every timestamp must be UTC to compare.
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)
