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
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models.db import chunks, insert_ignore, session_scope
from models.directory import users as directory_users
from models.settings import Settings
from models.tables import Account, Invitation, Tenant, as_utc, utcnow
from workers.mail.message import Mail, UnusableAddressError, invitation_template, message_id
from workers.mail.transport import PermanentMailError, RecipientDeferredError, TransientMailError

log = logging.getLogger(__name__)

# Per invitation id of a job: "retry" = released for the job's Dramatiq retry;
# "postponed" = released and sent again at once in a new message (SEND_BUDGET).
# "waiting" = its day under the tenant's daily cap has not come yet (the sweep sends it then).
Outcome = Literal["sent", "already_done", "claimed_elsewhere", "failed", "retry", "postponed", "waiting"]

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
DAY = timedelta(days=1)


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
    batch = _Batch(engine, claimed_at, BatchResult(outcomes))
    for index, claim in enumerate(claims):
        moment = as_utc(now())
        if moment - claimed_at > SEND_BUDGET:
            # A slow server: the rest would be sent after their lease ran out.
            batch.postponed = claims[index:]
            break
        batch.record_if_due(moment)
        if not batch.attempt(mailer, settings, claim, claims[index + 1:], now):
            break
    batch.finish(as_utc(now()))
    return _in_order(batch.result, ids)


@dataclass
class _Batch:
    """One job's progress: rows sent, failed for good or to give back, and when they were last recorded."""

    engine: Engine
    claimed_at: datetime
    result: BatchResult
    sent: list[tuple[_Claim, datetime]] = field(default_factory=list)
    failed: list[tuple[_Claim, str]] = field(default_factory=list)
    retry: list[tuple[_Claim, str | None]] = field(default_factory=list)
    postponed: list[_Claim] = field(default_factory=list)
    deferred_in_a_row: int = 0
    last_record: datetime | None = None

    def record_if_due(self, moment: datetime) -> None:
        """On a slow server, record what was accepted before the next send (bounds the resend window)."""
        if (self.sent or self.failed) and moment - (self.last_record or self.claimed_at) >= RECORD_EVERY:
            _record(self.engine, self.sent, self.failed, moment)
            _note(self.result, self.sent, self.failed)
            self.sent, self.failed, self.last_record = [], [], moment

    def attempt(
        self, mailer: Mailer, settings: Settings, claim: _Claim, rest: Sequence[_Claim], now: Callable[[], datetime]
    ) -> bool:
        """Build and send one claim's mail; False when the batch must stop (the rest released for a retry)."""
        try:
            mail = _mail(settings, claim)
            if isinstance(mail, str):
                self.failed.append((claim, mail))
                return True
            mailer.send(mail)
        except PermanentMailError as error:
            log.warning("invitation %s refused for good (%s)", claim.invitation_id, error.code or type(error).__name__)
            self.failed.append((claim, error.reason))
            return True
        except RecipientDeferredError as error:
            return self._deferred(claim, rest, error)
        except Exception as error:
            reason = error.reason if isinstance(error, TransientMailError) else f"unexpected {type(error).__name__}"
            self._stop(claim, reason, rest, error)
            log.info("invitation %s not sent this time (%s); %d of its batch released for a retry",
                     claim.invitation_id, type(error).__name__, len(rest) + 1)
            return False
        # A crash from here to the commit that records it is the one resend window.
        self.sent.append((claim, as_utc(now())))
        self.deferred_in_a_row = 0
        return True

    def _deferred(self, claim: _Claim, rest: Sequence[_Claim], error: RecipientDeferredError) -> bool:
        self.deferred_in_a_row += 1
        if self.deferred_in_a_row < DEFERRED_IN_A_ROW:
            # This recipient only (greylisting, a full mailbox): the others of the batch still go.
            self.retry.append((claim, error.reason))
            self.result.error = self.result.error or error
            return True
        self._stop(claim, error.reason, rest, error)
        log.info("%d recipients in a row deferred; %d of the batch released for a retry",
                 self.deferred_in_a_row, len(rest))
        return False

    def _stop(self, claim: _Claim, reason: str, rest: Sequence[_Claim], error: Exception) -> None:
        """The server's trouble, not this recipient's: this row and the untried rest go back for the job's retry."""
        self.retry.append((claim, reason))
        self.retry.extend((untried, None) for untried in rest)
        self.result.error = error

    def finish(self, at: datetime) -> None:
        """Record the rest in one transaction and fill in every claimed row's outcome."""
        _record(self.engine, self.sent, self.failed, at,
                release=self.retry, postpone=self.postponed, claimed_at=self.claimed_at)
        _note(self.result, self.sent, self.failed)
        self.result.outcomes.update((claim.invitation_id, "retry") for claim, _ in self.retry)
        self.result.outcomes.update((claim.invitation_id, "postponed") for claim in self.postponed)
        if self.postponed:
            log.info("%d invitations of a batch postponed: the mail server is slow", len(self.postponed))


@dataclass(frozen=True)
class Wanted:
    """A user who gained access for the first time and is to be invited at this address."""

    user_id: str
    address: str


def queue_invitations(
    session: Session, tenant_id: str, wanted: Sequence[Wanted], now: datetime, *, daily_cap: int
) -> list[str]:
    """Invitation rows in the caller's transaction; returns the ids to send now (the rest wait for their day).

    One invitation per user for the tenant's life (a unique index) and one per
    address: a user deleted and re-created with the same address is not mailed
    again. At most ``daily_cap`` invitations per tenant per UTC day; the rest
    are planned for the next days, with the reason shown to the admin. Runs
    under the tenant's reconcile lock, so two reconciles never plan one day twice.
    """
    now = as_utc(now)
    fresh = _new_addresses(session, tenant_id, wanted)
    if not fresh:
        return []
    days = _plan_days(session, tenant_id, len(fresh), now, daily_cap)
    rows = [
        {
            "id": f"inv{one.user_id}",
            "tenant_id": tenant_id,
            "user_id": one.user_id,
            "status": "pending",
            "address": one.address[:512],
            "address_key": _address_key(one.address),
            "message_id": message_id(tenant_id, one.user_id),
            "attempts": 0,
            "created_at": now,
            "enqueued_at": now,
            "send_day": day,
            "wait_reason": None if day <= now else _wait_reason(daily_cap, day),
        }
        for one, day in zip(fresh, days, strict=True)
    ]
    due_now: list[str] = []
    sendable = {row["id"] for row in rows if row["send_day"] <= now}
    for chunk in chunks(rows):
        # Core on the table, not the ORM entity: a burst queues thousands in one reconcile.
        statement = (
            insert_ignore(session)(Invitation.__table__)
            .values(list(chunk))
            .on_conflict_do_nothing(index_elements=["tenant_id", "user_id"])
            .returning(Invitation.__table__.c.id)
        )
        due_now.extend(inv_id for (inv_id,) in session.connection().execute(statement) if inv_id in sendable)
    waiting = len(rows) - len(due_now)
    if waiting:
        log.info("tenant %s: %d invitation(s) wait for a later day (daily cap %d)", tenant_id, waiting, daily_cap)
    return due_now


def replan_waiting(session: Session, tenant_id: str, now: datetime, *, daily_cap: int) -> list[str]:
    """After the tenant's cap changed: plan the waiting invitations again under it; returns those due now."""
    now = as_utc(now)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    later = (Invitation.tenant_id == tenant_id, Invitation.status == "pending", Invitation.send_day > now)
    waiting = list(session.execute(
        select(Invitation.id).where(*later).order_by(Invitation.send_day, Invitation.created_at, Invitation.id)
    ).scalars())
    if not waiting:
        return []
    # Their old days are given up first (under the tenant's lock), so the plan starts from today's own use.
    session.execute(update(Invitation).where(*later).values(send_day=None).execution_options(synchronize_session=False))
    days = _plan_days(session, tenant_id, len(waiting), now, daily_cap)
    by_day: dict[datetime, list[str]] = {}
    for invitation_id, day in zip(waiting, days, strict=True):
        by_day.setdefault(day, []).append(invitation_id)
    for day, ids in by_day.items():
        for chunk in chunks(ids):
            session.execute(
                update(Invitation).where(Invitation.id.in_(chunk))
                .values(send_day=day, wait_reason=None if day <= now else _wait_reason(daily_cap, day))
                .execution_options(synchronize_session=False)
            )
    due_now = by_day.get(today, [])
    if due_now:
        log.info("tenant %s: %d waiting invitation(s) go out today under the new daily cap", tenant_id, len(due_now))
    return due_now


def _address_key(address: str) -> str:
    # Case-folded in Python: SQLite's lower() is ASCII-only.
    return address.strip().casefold()[:512]


def _new_addresses(session: Session, tenant_id: str, wanted: Sequence[Wanted]) -> list[Wanted]:
    """Drop the users whose address already has an invitation of this tenant (or appears twice in this batch).

    A re-created user whose address was invited before shows that invitation's
    moment as its own invited_at.
    """
    first: dict[str, Wanted] = {}
    for one in wanted:
        first.setdefault(_address_key(one.address), one)
    keys = list(first)
    earlier: dict[str, datetime | None] = {}
    for chunk in chunks(keys):
        # A failed invitation never reached the person: a new one may try again.
        for key, sent_at in session.execute(
            select(Invitation.address_key, Invitation.sent_at).where(
                Invitation.tenant_id == tenant_id,
                Invitation.address_key.in_(chunk),
                Invitation.status != "failed",
            )
        ):
            earlier[key] = sent_at if earlier.get(key) is None else earlier[key]
    invited_before = {first[key].user_id: sent_at for key, sent_at in earlier.items() if sent_at is not None}
    if invited_before:
        session.execute(
            update(Account)
            .where(Account.user_id.in_(list(invited_before)), Account.invited_at.is_(None))
            .values(invited_at=_per_row(Account.user_id, invited_before))
            .execution_options(synchronize_session=False)
        )
    skipped = len(wanted) - len(first) + len(earlier)
    if skipped:
        log.info("tenant %s: %d invitation(s) skipped, their address was invited already", tenant_id, skipped)
    return [one for key, one in first.items() if key not in earlier]


def _plan_days(session: Session, tenant_id: str, count: int, now: datetime, daily_cap: int) -> list[datetime]:
    """The UTC day (its midnight) of each of ``count`` new invitations: today while its cap lasts, then the next days."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    planned = {
        as_utc(day): used
        for day, used in session.execute(
            select(Invitation.send_day, func.count())
            .where(Invitation.tenant_id == tenant_id, Invitation.send_day >= today)
            .group_by(Invitation.send_day)
        )
    }
    days: list[datetime] = []
    day = today
    for _ in range(count):
        while planned.get(day, 0) >= daily_cap:
            day += DAY
        planned[day] = planned.get(day, 0) + 1
        days.append(day)
    return days


def _wait_reason(daily_cap: int, day: datetime) -> str:
    return (f"Daily invitation limit reached ({daily_cap} per day for this tenant): "
            f"sent on {day.date().isoformat()} (UTC).")


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
        # And only a row whose day has come: one waiting under the daily cap was never tried.
        rows = session.execute(
            select(Invitation.id, Invitation.user_id, Invitation.error)
            .where(Invitation.id.in_(ids), Invitation.status == "pending", _day_has_come(at))
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


def reopen(engine: Engine, invitation_ids: Iterable[str]) -> list[str]:
    """Failed invitations pending again, because an operator retried the job that gave them up; returns those.

    Their error stays on the row and the account until a send records success.
    A row refused for good in that job is no longer the message's own (send_invitation
    narrows it away), so it is not among these ids unless the message is from before
    narrowing; sent once more, the mail server refuses it again.
    """
    ids = list(invitation_ids)
    if not ids:
        return []
    with session_scope(engine) as session:
        reopened = [invitation_id for (invitation_id,) in session.execute(
            update(Invitation)
            .where(Invitation.id.in_(ids), Invitation.status == "failed")
            .values(status="pending", claimed_at=None)
            .returning(Invitation.id)
            .execution_options(synchronize_session=False)
        )]
    if reopened:
        log.info("%d given-up invitation(s) pending again (the operator retried their job)", len(reopened))
    return reopened


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
            _day_has_come(now),
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


def _day_has_come(now: datetime):
    # The daily cap: a row planned for a later day is not sent before then.
    return or_(Invitation.send_day.is_(None), Invitation.send_day <= now)


def _claim(engine: Engine, ids: list[str], claimed_at: datetime) -> tuple[list[_Claim], dict[str, Outcome]]:
    """Take the batch's claimable rows with one conditional UPDATE; only the worker whose UPDATE matched may send."""
    if not ids:
        return [], {}
    with session_scope(engine) as session:
        taken = _take(session, ids, claimed_at)
        outcomes = _not_taken(session, [i for i in ids if i not in taken], claimed_at)
        if not taken:
            return [], outcomes
        tenants, names = _greetings(session, list(taken.values()))
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


def _take(session: Session, ids: list[str], claimed_at: datetime) -> dict[str, Any]:
    """The conditional UPDATE … RETURNING: pending rows (or expired claims) whose day has come become ours."""
    return {
        row.id: row
        for row in session.execute(
            update(Invitation)
            .where(
                Invitation.id.in_(ids),
                or_(
                    Invitation.status == "pending",
                    and_(Invitation.status == "sending", _lease_expired(claimed_at)),
                ),
                _day_has_come(claimed_at),
            )
            .values(status="sending", claimed_at=claimed_at, attempts=Invitation.attempts + 1, wait_reason=None)
            .returning(Invitation.id, Invitation.tenant_id, Invitation.user_id, Invitation.address,
                       Invitation.message_id)
            .execution_options(synchronize_session=False)
        )
    }


def _not_taken(session: Session, others: list[str], claimed_at: datetime) -> dict[str, Outcome]:
    """Why each id the claim did not take is not ours: done already, waiting for its day, or another worker's."""
    if not others:
        return {}
    found = {
        invitation_id: (status, send_day)
        for invitation_id, status, send_day in session.execute(
            select(Invitation.id, Invitation.status, Invitation.send_day).where(Invitation.id.in_(others))
        )
    }
    outcomes: dict[str, Outcome] = {}
    for invitation_id in others:
        status, send_day = found.get(invitation_id, (None, None))
        if status is None:
            log.warning("invitation %s does not exist; nothing to send", invitation_id)
        if status in (None, "sent", "failed"):
            outcomes[invitation_id] = "already_done"
        elif send_day is not None and as_utc(send_day) > claimed_at:
            outcomes[invitation_id] = "waiting"
        else:
            log.info("invitation %s is being sent by another worker", invitation_id)
            outcomes[invitation_id] = "claimed_elsewhere"
    return outcomes


def _greetings(session: Session, taken: list[Any]) -> tuple[dict[str, str], dict[str, str | None]]:
    """The tenants' names and the users' display names the mails greet with, in one read each."""
    tenants = dict(session.execute(
        select(Tenant.id, Tenant.name).where(Tenant.id.in_({row.tenant_id for row in taken}))
    ).all())
    names = {
        user_id: _display_name(display_name, data)
        for user_id, (display_name, data) in directory_users.names(session, [row.user_id for row in taken]).items()
    }
    return tenants, names


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
        _record_sent(session, sent)
        _record_failed(session, failed, at)
        _release(session, release, postpone, claimed_at, at)
    if sent:
        log.info("%d invitation(s) sent", len(sent))


def _record_sent(session: Session, sent: list[tuple[_Claim, datetime]]) -> None:
    """Rows the mail server accepted become "sent", and their accounts invited, each at its own moment."""
    if not sent:
        return
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


def _record_failed(session: Session, failed: list[tuple[_Claim, str]], at: datetime) -> None:
    """Rows refused for good become "failed", the reason on the row and on the account."""
    if not failed:
        return
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


def _release(
    session: Session,
    release: Sequence[tuple[_Claim, str | None]],
    postpone: Sequence[_Claim],
    claimed_at: datetime | None,
    at: datetime,
) -> None:
    """Give our claims back as "pending": tried rows keep their error, untried rows their attempt."""
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


