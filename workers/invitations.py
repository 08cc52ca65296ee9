"""The invitation protocol: claim the rows, send outside any transaction, record — at least once, duplicate-safe.

DESIGN.md "Invitations are at-least-once, made duplicate-safe": a row is
claimed before its mail is sent and every (re)send carries the Message-ID
derived from tenant and user, so the only duplicate is a resend after a worker
died between the mail server's acceptance and the commit that records it (or
after a send that outlived CLAIM_LEASE). A receiving system that deduplicates
on Message-ID shows that duplicate once.

A burst invites thousands of users, so one job handles a batch of ids:

- one conditional UPDATE … RETURNING claims every row of the batch that is
  pending (or whose claim expired), and one read fetches the names to greet;
- the mails go out one by one over the thread's reused SMTP connection (or to
  the outbox), no transaction open meanwhile;
- what the server accepted is recorded in one transaction (invitation rows
  and the accounts' invited_at, each the moment its own mail was accepted),
  at the end of the batch and, on a slow server, before the next send once
  RECORD_EVERY has passed: a worker that dies mid-batch leaves at most the
  mails of its last RECORD_EVERY unrecorded, each resent with its Message-ID;
- a permanent refusal fails that row only; a deferred recipient releases
  that row only; any other transient failure (server unreachable, hanging
  up, 421) stops the batch: what was sent is recorded first, the rows not yet
  sent are released, and the job raises for Dramatiq's retry;
- no send starts more than SEND_BUDGET after the claim, so every send ends
  well inside the claim's lease; rows left when the budget is spent are
  released and re-sent as a new message (``postponed``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models.db import chunks, session_scope
from models.settings import Settings
from models.directory import users as directory_users
from models.tables import Account, Invitation, Tenant, as_utc, utcnow
from workers.mailer import (
    Mail,
    PermanentMailError,
    RecipientDeferredError,
    TransientMailError,
    UnusableAddressError,
    invitation_template,
)

log = logging.getLogger(__name__)

# Per invitation id of a job: "retry" = released for the job's Dramatiq retry;
# "postponed" = released and sent again at once in a new message (SEND_BUDGET).
Outcome = Literal["sent", "already_done", "claimed_elsewhere", "failed", "retry", "postponed"]

# A "sending" claim older than this belongs to a worker that died: it may be re-claimed.
CLAIM_LEASE = timedelta(seconds=60)
# No send starts later than this after the claim: one send (three attempts that
# each stall once on the mailer's 10 s timeout) then still ends inside CLAIM_LEASE.
SEND_BUDGET = timedelta(seconds=15)
# Accepted mails wait at most this long for the commit that records them (the
# resend window if the worker dies); on a fast server a batch is one commit.
RECORD_EVERY = timedelta(seconds=0.1)
# A pending invitation enqueued less than this long ago still has its message
# on the way (or a Dramatiq retry scheduled): the sweep leaves it alone.
ENQUEUE_GRACE = timedelta(seconds=60)
# Ids per send_invitation message: one claim and one record per this many mails.
BATCH_SIZE = 100
# This many recipients deferred in a row is the server's trouble, not theirs: the batch stops.
DEFERRED_IN_A_ROW = 3
# Account.invite_error holds at most 1024 characters, Invitation.error 2048.
MAX_ERROR = 1024


class Mailer(Protocol):
    def send(self, mail: Mail) -> None: ...


@dataclass(frozen=True)
class _Claim:
    """What the claim transaction read: enough to build and send the mail without a transaction open."""

    invitation_id: str
    tenant_id: str
    user_id: str
    address: str | None
    message_id: str
    tenant_name: str
    display_name: str | None


@dataclass
class BatchResult:
    """What one job did with each of its ids, and the transient failure to raise for Dramatiq's retry, if any."""

    outcomes: dict[str, Outcome]
    error: Exception | None = None

    def ids(self, outcome: Outcome) -> list[str]:
        return [invitation_id for invitation_id, got in self.outcomes.items() if got == outcome]

    def counts(self) -> Counter[str]:
        return Counter(self.outcomes.values())


def batches(invitation_ids: Sequence[str], *, size: int = BATCH_SIZE, spread: int = 1) -> Iterator[list[str]]:
    """The ids in messages of at most ``size``, and in at least ``spread`` messages when there are that many.

    ``spread`` (the worker threads) keeps a small burst on a slow mail server
    from being one thread's sequential job while the other threads idle.
    """
    ids = list(invitation_ids)
    if not ids:
        return
    size = max(1, min(size, -(-len(ids) // max(1, spread))))
    yield from chunks(ids, size)


def send_invitation(
    engine: Engine,
    mailer: Mailer,
    settings: Settings,
    invitation_id: str,
    now: Callable[[], datetime] = utcnow,
) -> Outcome:
    """Claim, send and record one invitation; raises on a transient failure so the job is retried."""
    result = send_invitations(engine, mailer, settings, [invitation_id], now=now)
    if result.error is not None:
        raise result.error
    return result.outcomes[invitation_id]


def send_invitations(
    engine: Engine,
    mailer: Mailer,
    settings: Settings,
    invitation_ids: Iterable[str],
    now: Callable[[], datetime] = utcnow,
) -> BatchResult:
    """Claim, send and record a batch; a transient failure is returned (sent rows recorded, the rest released)."""
    ids = list(dict.fromkeys(invitation_ids))
    claimed_at = as_utc(now())
    claims, outcomes = _claim(engine, ids, claimed_at)
    result = BatchResult(outcomes)
    if not claims:
        return _in_order(result, ids)

    sent: list[tuple[_Claim, datetime]] = []
    failed: list[tuple[_Claim, str]] = []
    retry: list[tuple[_Claim, str | None]] = []
    postponed: list[_Claim] = []
    last_record = claimed_at
    deferred_in_a_row = 0
    for index, claim in enumerate(claims):
        moment = as_utc(now())
        if moment - claimed_at > SEND_BUDGET:
            # A slow server: the rest would be sent after their lease ran out.
            postponed = claims[index:]
            break
        if (sent or failed) and moment - last_record >= RECORD_EVERY:
            _record(engine, sent, failed, moment)
            _note(result, sent, failed)
            sent, failed, last_record = [], [], moment
        try:
            mail = _mail(settings, claim)
            if isinstance(mail, str):
                failed.append((claim, mail))
                continue
            mailer.send(mail)
        except PermanentMailError as error:
            log.warning("invitation %s refused for good (%s)", claim.invitation_id, error.code or type(error).__name__)
            failed.append((claim, error.reason))
            continue
        except RecipientDeferredError as error:
            deferred_in_a_row += 1
            if deferred_in_a_row < DEFERRED_IN_A_ROW:
                # This recipient only (greylisting, a full mailbox): the others of the batch still go.
                retry.append((claim, error.reason))
                result.error = result.error or error
                continue
            retry.append((claim, error.reason))
            retry.extend((untried, None) for untried in claims[index + 1:])
            result.error = error
            log.info("%d recipients in a row deferred; %d of the batch released for a retry",
                     deferred_in_a_row, len(claims) - index - 1)
            break
        except Exception as error:
            reason = error.reason if isinstance(error, TransientMailError) else f"unexpected {type(error).__name__}"
            retry.append((claim, reason))
            retry.extend((untried, None) for untried in claims[index + 1:])
            result.error = error
            log.info("invitation %s not sent this time (%s); %d of its batch released for a retry",
                     claim.invitation_id, type(error).__name__, len(claims) - index)
            break
        # A crash from here to the commit that records it is the one resend window.
        sent.append((claim, as_utc(now())))
        deferred_in_a_row = 0

    _record(engine, sent, failed, as_utc(now()), release=retry, postpone=postponed, claimed_at=claimed_at)
    _note(result, sent, failed)
    result.outcomes.update((claim.invitation_id, "retry") for claim, _ in retry)
    result.outcomes.update((claim.invitation_id, "postponed") for claim in postponed)
    if postponed:
        log.info("%d invitations of a batch postponed: the mail server is slow", len(postponed))
    return _in_order(result, ids)


def give_up(
    engine: Engine, invitation_ids: str | Iterable[str], reason: str, now: Callable[[], datetime] = utcnow
) -> list[str]:
    """Mark pending invitations failed after the job's last retry, so the admin sees why; returns those it marked."""
    ids = [invitation_ids] if isinstance(invitation_ids, str) else list(invitation_ids)
    at = as_utc(now())
    given_up: list[str] = []
    with session_scope(engine) as session:
        # Only "pending": a row still "sending" may have been accepted by the
        # mail server; its lease expires and the sweep resends it instead.
        rows = session.execute(
            select(Invitation.id, Invitation.user_id, Invitation.error)
            .where(Invitation.id.in_(ids), Invitation.status == "pending")
        ).all()
        for invitation_id, user_id, last_error in rows:
            full = f"{reason} (last error: {last_error})" if last_error else reason
            full = full[:MAX_ERROR]
            changed = session.execute(
                update(Invitation)
                .where(Invitation.id == invitation_id, Invitation.status == "pending")
                .values(status="failed", error=full, claimed_at=None)
            ).rowcount
            if changed:
                session.execute(
                    update(Account).where(Account.user_id == user_id).values(updated_at=at, invite_error=full)
                )
                given_up.append(invitation_id)
    if given_up:
        log.warning("%d invitation(s) given up after their retries", len(given_up))
    return given_up


def due_invitations(session: Session, now: datetime, limit: int = 1000) -> list[str]:
    """Ids the sweep should (re-)enqueue: pending without a recent enqueue, or sending with an expired lease."""
    now = as_utc(now)
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
            .values(enqueued_at=as_utc(now))
        )


# -- the steps ---------------------------------------------------------------------


def _lease_expired(now: datetime):
    return or_(Invitation.claimed_at.is_(None), Invitation.claimed_at < now - CLAIM_LEASE)


def _claim(engine: Engine, ids: list[str], claimed_at: datetime) -> tuple[list[_Claim], dict[str, Outcome]]:
    """Take the batch's claimable rows with one conditional UPDATE; only the worker whose UPDATE matched may send."""
    if not ids:
        return [], {}
    with session_scope(engine) as session:
        taken = {
            row.id: row
            for row in session.execute(
                update(Invitation)
                .where(
                    Invitation.id.in_(ids),
                    or_(
                        Invitation.status == "pending",
                        and_(Invitation.status == "sending", _lease_expired(claimed_at)),
                    ),
                )
                .values(status="sending", claimed_at=claimed_at, attempts=Invitation.attempts + 1)
                .returning(Invitation.id, Invitation.tenant_id, Invitation.user_id, Invitation.address,
                           Invitation.message_id)
                .execution_options(synchronize_session=False)
            )
        }
        outcomes: dict[str, Outcome] = {}
        others = [invitation_id for invitation_id in ids if invitation_id not in taken]
        if others:
            statuses = dict(session.execute(
                select(Invitation.id, Invitation.status).where(Invitation.id.in_(others))
            ).all())
            for invitation_id in others:
                status = statuses.get(invitation_id)
                if status is None:
                    log.warning("invitation %s does not exist; nothing to send", invitation_id)
                if status in (None, "sent", "failed"):
                    outcomes[invitation_id] = "already_done"
                else:
                    log.info("invitation %s is being sent by another worker", invitation_id)
                    outcomes[invitation_id] = "claimed_elsewhere"
        if not taken:
            return [], outcomes
        tenants = dict(session.execute(
            select(Tenant.id, Tenant.name).where(Tenant.id.in_({row.tenant_id for row in taken.values()}))
        ).all())
        names = {
            user_id: _display_name(display_name, data)
            for user_id, (display_name, data) in directory_users.names(
                session, [row.user_id for row in taken.values()]
            ).items()
        }
    claims = [
        _Claim(
            invitation_id=row.id,
            tenant_id=row.tenant_id,
            user_id=row.user_id,
            address=row.address,
            message_id=row.message_id,
            tenant_name=tenants.get(row.tenant_id) or "",
            display_name=names.get(row.user_id),
        )
        for row in (taken[invitation_id] for invitation_id in ids if invitation_id in taken)
    ]
    return claims, outcomes


def _mail(settings: Settings, claim: _Claim) -> Mail | str:
    """The claim's mail, or the reason it cannot be sent (a permanent failure of that row)."""
    if not claim.address:
        return "the user has no email address to invite"
    try:
        template = invitation_template(
            mail_from=settings.mail_from, tenant_name=claim.tenant_name, login_url=settings.public_base_url
        )
        return template.render(to_address=claim.address, display_name=claim.display_name,
                               message_id=claim.message_id)
    except UnusableAddressError:
        return "the user's email address is not usable"
    except ValueError as error:
        return f"the invitation cannot be built: {error}"


def _record(
    engine: Engine,
    sent: list[tuple[_Claim, datetime]],
    failed: list[tuple[_Claim, str]],
    at: datetime,
    *,
    release: Sequence[tuple[_Claim, str | None]] = (),
    postpone: Sequence[_Claim] = (),
    claimed_at: datetime | None = None,
) -> None:
    """One transaction: rows sent (invited_at = each acceptance), rows failed for good, rows given back."""
    if not (sent or failed or release or postpone):
        return
    with session_scope(engine) as session:
        if sent:
            accepted = {claim.invitation_id: when for claim, when in sent}
            # Whoever holds the row now, the mail server accepted this message:
            # "sent" is the truth (the first recorded sent_at stays).
            recorded = session.execute(
                update(Invitation)
                .where(Invitation.id.in_(list(accepted)), Invitation.status != "sent")
                .values(status="sent", sent_at=_per_row(Invitation.id, accepted), error=None)
                .returning(Invitation.id, Invitation.user_id)
                .execution_options(synchronize_session=False)
            ).all()
            invited = {user_id: accepted[invitation_id] for invitation_id, user_id in recorded}
            if invited:
                moments = _per_row(Account.user_id, invited)
                session.execute(
                    update(Account)
                    .where(Account.user_id.in_(list(invited)))
                    .values(invited_at=moments, invite_error=None, updated_at=moments)
                    .execution_options(synchronize_session=False)
                )
        if failed:
            reasons = {claim.invitation_id: reason[:MAX_ERROR] for claim, reason in failed}
            marked = session.execute(
                update(Invitation)
                .where(Invitation.id.in_(list(reasons)), Invitation.status != "sent")
                .values(status="failed", error=_per_row(Invitation.id, reasons))
                .returning(Invitation.id, Invitation.user_id)
                .execution_options(synchronize_session=False)
            ).all()
            by_user = {user_id: reasons[invitation_id] for invitation_id, user_id in marked}
            if by_user:
                session.execute(
                    update(Account)
                    .where(Account.user_id.in_(list(by_user)))
                    .values(invite_error=_per_row(Account.user_id, by_user), updated_at=at)
                    .execution_options(synchronize_session=False)
                )
        # Give back only our own claims (a re-claim after our lease is not ours);
        # enqueued_at: a message is on its way (Dramatiq's retry, or the new one
        # for postponed rows), so the sweep waits its grace before adding another.
        ours = (Invitation.status == "sending", Invitation.claimed_at == claimed_at)
        tried = {claim.invitation_id: reason[:MAX_ERROR] for claim, reason in release if reason is not None}
        if tried:
            session.execute(
                update(Invitation)
                .where(Invitation.id.in_(list(tried)), *ours)
                .values(status="pending", claimed_at=None, error=_per_row(Invitation.id, tried), enqueued_at=at)
                .execution_options(synchronize_session=False)
            )
        untried = [claim.invitation_id for claim, reason in release if reason is None]
        untried += [claim.invitation_id for claim in postpone]
        if untried:
            # Never handed to the mail server this time: the claim's attempt is given back.
            session.execute(
                update(Invitation)
                .where(Invitation.id.in_(untried), *ours)
                .values(status="pending", claimed_at=None, attempts=Invitation.attempts - 1, enqueued_at=at)
                .execution_options(synchronize_session=False)
            )
    if sent:
        log.info("%d invitation(s) sent", len(sent))


def _per_row(key, values: dict[str, Any]):
    """CASE key WHEN … THEN …: one UPDATE gives every row its own value (portable to SQLite and PostgreSQL)."""
    return case(values, value=key)


def _note(result: BatchResult, sent: list[tuple[_Claim, datetime]], failed: list[tuple[_Claim, str]]) -> None:
    result.outcomes.update((claim.invitation_id, "sent") for claim, _ in sent)
    result.outcomes.update((claim.invitation_id, "failed") for claim, _ in failed)


def _in_order(result: BatchResult, ids: list[str]) -> BatchResult:
    result.outcomes = {invitation_id: result.outcomes[invitation_id] for invitation_id in ids}
    return result


def _display_name(display_name: str | None, data: Any) -> str | None:
    """displayName, else name.formatted, else given and family name (RFC 7643 §4.1.1)."""
    if display_name:
        return display_name
    name = data.get("name") if isinstance(data, dict) else None
    if isinstance(name, dict):
        if isinstance(name.get("formatted"), str) and name["formatted"].strip():
            return name["formatted"]
        parts = [name.get(key) for key in ("givenName", "familyName")]
        joined = " ".join(part for part in parts if isinstance(part, str) and part.strip())
        if joined:
            return joined
    return None


