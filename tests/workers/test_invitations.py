"""The invitation protocol: claim, send outside the transaction, record — against real SMTP and a SQLite file.

DESIGN.md "Invitations are at-least-once, made duplicate-safe": the row is
claimed before sending; every (re)send carries the Message-ID derived from
tenant and user; a resend only happens when a worker dies between the mail
server's acceptance and the commit that records it. CONTRACT.md "Invitations":
``invited_at`` is when the mail server accepted the message.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from dramatiq import Message, Worker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage, Middleware
from sqlalchemy import event, update
from sqlalchemy.engine import Engine, make_url

from billing.gateway import LedgerGateway
from models.db import make_engine, session_scope
from models.migrate import upgrade
from models.settings import Settings
from models.tables import Account, Invitation, ScimUser, Tenant
from tests.conftest import wipe
from tests.workers.support import bind_actors, drain, send_one
from workers import runtime
from workers.deadletters import requeued
from workers.invitations import (
    BATCH_SIZE,
    CLAIM_LEASE,
    DEFERRED_IN_A_ROW,
    RECORD_EVERY,
    SEND_BUDGET,
    batches,
    due_invitations,
    give_up,
    mark_enqueued,
    send_invitations,
)
from workers.mail.message import message_id
from workers.mail.transport import OutboxMailer, RecipientDeferredError, TransientMailError, make_mailer
from workers.names import LAST_ERROR, OPERATOR_RETRY, OWNED_IDS, QUEUES
from workers.sweep import Sweeper
from workers.telemetry import Telemetry
from workers.wakeup import Waker

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, at: datetime = T0) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class WorkerDied(BaseException):
    """The process is killed: nothing after this line of the worker runs (no release, no record)."""


class DiesAfterAcceptance:
    """A mailer whose worker is killed right after the mail server accepted the message."""

    def __init__(self, mailer) -> None:
        self.mailer = mailer

    def send(self, msg) -> None:
        self.mailer.send(msg)
        raise WorkerDied


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back the UTC digits without the zone."""
    return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


@pytest.fixture
def engine(tmp_path: Path, database_url: str):
    """The run's PostgreSQL database, emptied, on the second pass (TEST_DATABASE_URL); else a SQLite file."""
    if make_url(database_url).get_backend_name() == "postgresql":
        engine = make_engine(database_url)
        upgrade(engine)
        wipe(engine)
    else:
        engine = make_engine(f"sqlite:///{tmp_path}/t.db")
        upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        var_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path}/t.db",
        public_base_url="https://sally.example/",
        mail_from="Sally <no-reply@sally.example>",
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


def add_user(
    engine: Engine,
    tenant_id: str = "t1",
    user_id: str = "u1",
    *,
    address: str | None = "zoe@acme.example",
    status: str = "pending",
    **invitation: object,
) -> str:
    """A user of Acme with access and an invitation row, as reconcile leaves them."""
    with session_scope(engine) as session:
        if session.get(Tenant, tenant_id) is None:
            session.add(Tenant(id=tenant_id, name="Acme", auto_invite=True))
            session.flush()
        session.add(ScimUser(id=user_id, tenant_id=tenant_id, user_name=f"{user_id}@acme.example",
                             user_name_key=f"{user_id}@acme.example", display_name="Zoë Martin", data={}))
        session.flush()
        session.add(Account(user_id=user_id, tenant_id=tenant_id, role="user", status="active", first_access_at=T0))
        fields = {"created_at": T0, "enqueued_at": T0, **invitation}
        row = Invitation(tenant_id=tenant_id, user_id=user_id, address=address, status=status,
                         message_id=message_id(tenant_id, user_id), **fields)
        session.add(row)
    return row.id


def load(engine: Engine, invitation_id: str) -> tuple[Invitation, Account]:
    with session_scope(engine) as session:
        invitation = session.get(Invitation, invitation_id)
        return invitation, session.get(Account, invitation.user_id)


def test_an_invitation_is_sent_once_and_recorded(engine, settings, smtp, mailer, clock):
    """Given a pending invitation for Zoë, When the job runs,
    Then one mail with the tenant/user Message-ID reaches the server, the row is "sent",
    and the account's invited_at is the time the server accepted it.
    """
    invitation_id = add_user(engine)

    outcome = send_one(engine, mailer, settings, invitation_id, now=clock)

    assert outcome == "sent"
    assert smtp.message_ids() == ["<invite.t1.u1@sally-scim.invalid>"]
    received = smtp.messages[0]
    assert received["To"] == "Zoë Martin <zoe@acme.example>"
    assert received["From"] == "Sally <no-reply@sally.example>"
    assert "https://sally.example" in received.get_body(("plain",)).get_content()
    invitation, account = load(engine, invitation_id)
    assert (invitation.status, invitation.attempts, invitation.error) == ("sent", 1, None)
    assert aware(invitation.sent_at) == T0
    assert aware(account.invited_at) == T0 and account.invite_error is None


def test_a_second_run_sends_nothing(engine, settings, smtp, mailer, clock):
    """Given an invitation already sent, When the job runs again (a duplicate message),
    Then it answers already_done and the server still holds one mail.
    """
    invitation_id = add_user(engine)
    send_one(engine, mailer, settings, invitation_id, now=clock)

    assert send_one(engine, mailer, settings, invitation_id, now=clock) == "already_done"
    assert len(smtp.messages) == 1


def test_a_claim_held_by_another_worker_is_respected(engine, settings, smtp, mailer, clock):
    """Given worker A is in the middle of sending, When worker B runs the same job,
    Then B answers claimed_elsewhere without mailing, and A's mail is the only one.
    """
    invitation_id = add_user(engine)
    outcomes: list[str] = []

    class SecondWorkerDuringSend:
        def send(self, msg) -> None:
            outcomes.append(send_one(engine, mailer, settings, invitation_id, now=clock))
            mailer.send(msg)

    assert send_one(engine, SecondWorkerDuringSend(), settings, invitation_id, now=clock) == "sent"
    assert outcomes == ["claimed_elsewhere"]
    assert len(smtp.messages) == 1


def test_concurrent_workers_send_one_mail(engine, settings, smtp, mailer):
    """Given eight worker threads that receive the same invitation job at once,
    When they all run it, Then exactly one mails it and records it.
    """
    invitation_id = add_user(engine)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        outcomes.append(send_one(engine, mailer, settings, invitation_id))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes).count("sent") == 1
    assert set(outcomes) <= {"sent", "claimed_elsewhere", "already_done"}
    assert len(smtp.messages) == 1
    assert load(engine, invitation_id)[0].status == "sent"


def test_a_worker_killed_after_acceptance_resends_with_the_same_message_id(engine, settings, smtp, mailer, clock):
    """Given a worker killed after the server accepted the mail but before recording it,
    When another worker runs the job inside the lease, Then it leaves the claim alone;
    When the lease has expired, Then the sweep finds the row and the resend carries the
    SAME Message-ID: the one duplicate DESIGN.md allows, recognisable as such.
    """
    invitation_id = add_user(engine)
    with pytest.raises(WorkerDied):
        send_one(engine, DiesAfterAcceptance(mailer), settings, invitation_id, now=clock)
    assert load(engine, invitation_id)[0].status == "sending"

    clock.advance(30)
    assert send_one(engine, mailer, settings, invitation_id, now=clock) == "claimed_elsewhere"
    with session_scope(engine) as session:
        assert due_invitations(session, clock()) == []

    clock.advance(CLAIM_LEASE.total_seconds())
    with session_scope(engine) as session:
        assert due_invitations(session, clock()) == [invitation_id]
    assert send_one(engine, mailer, settings, invitation_id, now=clock) == "sent"

    assert smtp.message_ids() == [message_id("t1", "u1")] * 2
    invitation, account = load(engine, invitation_id)
    assert (invitation.status, invitation.attempts) == ("sent", 2)
    assert aware(account.invited_at) == T0 + timedelta(seconds=30) + CLAIM_LEASE


def test_a_421_is_retried_within_the_job(engine, settings, smtp, mailer, clock):
    """Given the server answers 421 once, When the job runs,
    Then the exchange is retried and the invitation is sent once.
    """
    invitation_id = add_user(engine)
    smtp.fail_next(1, "421 4.7.0 Try again later")

    assert send_one(engine, mailer, settings, invitation_id, now=clock) == "sent"
    assert len(smtp.messages) == 1
    assert smtp.data_attempts == 2


def test_a_transient_failure_releases_the_claim_for_the_jobs_retry(engine, settings, smtp, mailer, clock):
    """Given the server defers every attempt of the exchange, When the job runs,
    Then it raises TransientMailError (for Dramatiq's Retries) with the row pending again
    and the reason on it; When the retry runs after the server recovered, Then it is sent.
    """
    invitation_id = add_user(engine)
    smtp.fail_next(3, "451 4.3.0 Queue full")

    with pytest.raises(TransientMailError):
        send_one(engine, mailer, settings, invitation_id, now=clock)

    invitation, account = load(engine, invitation_id)
    assert (invitation.status, invitation.claimed_at, invitation.attempts) == ("pending", None, 1)
    assert "451 4.3.0 Queue full" in invitation.error
    assert account.invited_at is None and account.invite_error is None

    clock.advance(5)
    assert send_one(engine, mailer, settings, invitation_id, now=clock) == "sent"
    invitation, account = load(engine, invitation_id)
    assert (invitation.status, invitation.error, invitation.attempts) == ("sent", None, 2)
    assert len(smtp.messages) == 1


def test_giving_up_after_the_last_retry_is_visible(engine, settings, smtp, mailer, clock):
    """Given an invitation whose job failed transiently, When its retries are exhausted and give_up runs,
    Then the row is "failed" and the account's invite_error says why (with the last error);
    a late duplicate job then sends nothing.
    """
    invitation_id = add_user(engine)
    smtp.fail_next(3, "421 4.3.2 Shutting down")
    with pytest.raises(TransientMailError):
        send_one(engine, mailer, settings, invitation_id, now=clock)

    assert give_up(engine, invitation_id, "gave up after 5 retries") == [invitation_id]

    invitation, account = load(engine, invitation_id)
    assert invitation.status == "failed"
    assert account.invite_error.startswith("gave up after 5 retries (last error: ")
    assert "421 4.3.2 Shutting down" in account.invite_error
    assert send_one(engine, mailer, settings, invitation_id, now=clock) == "already_done"
    assert smtp.messages == []


def test_give_up_leaves_a_sent_or_sending_row_alone(engine, clock):
    """Given one invitation sent and one claimed by a live worker, When give_up runs for both,
    Then neither changes: only a pending row can be given up.
    """
    sent = add_user(engine, user_id="u1", status="sent", sent_at=T0)
    sending = add_user(engine, user_id="u2", status="sending", claimed_at=T0)

    assert give_up(engine, sent, "late") == []
    assert give_up(engine, sending, "late") == []
    assert load(engine, sent)[0].status == "sent"
    assert load(engine, sending)[0].status == "sending"


def test_a_550_fails_the_invitation_without_retry(engine, settings, smtp, mailer, clock):
    """Given the server refuses the recipient with 550, When the job runs,
    Then it answers failed after one attempt, the account's invite_error shows the reply,
    invited_at stays null, and running the job again sends nothing.
    """
    invitation_id = add_user(engine)
    smtp.fail_next(1, "550 5.1.1 <zoe@acme.example>: Recipient address rejected", at="RCPT")

    assert send_one(engine, mailer, settings, invitation_id, now=clock) == "failed"
    assert send_one(engine, mailer, settings, invitation_id, now=clock) == "already_done"

    assert smtp.rcpt_attempts == 1
    assert smtp.messages == []
    invitation, account = load(engine, invitation_id)
    assert invitation.status == "failed" and "550 5.1.1" in invitation.error
    assert account.invited_at is None
    assert account.invite_error == invitation.error


def test_a_row_without_address_fails_without_mailing(engine, settings, smtp, mailer, clock):
    """Given an invitation row with no address, When the job runs, Then it fails with a reason and nothing is sent."""
    invitation_id = add_user(engine, address=None)

    assert send_one(engine, mailer, settings, invitation_id, now=clock) == "failed"
    assert load(engine, invitation_id)[1].invite_error == "the user has no email address to invite"
    assert smtp.connections == 0


def test_fifty_invitations_share_one_smtp_connection(engine, settings, smtp, mailer, clock):
    """Given 50 pending invitations, When one worker thread sends them all,
    Then 50 distinct Message-IDs arrive over one SMTP session.
    """
    ids = [add_user(engine, user_id=f"u{n}", address=f"user{n}@acme.example") for n in range(50)]

    outcomes = [send_one(engine, mailer, settings, invitation_id, now=clock) for invitation_id in ids]

    assert outcomes == ["sent"] * 50
    assert len(set(smtp.message_ids())) == 50
    assert smtp.connections == 1


def test_without_smtp_the_invitation_lands_in_the_outbox_once(engine, settings, clock):
    """Given no SMTP_URL, When the job runs, its worker dies after writing, and the job runs again after the lease,
    Then var/outbox holds one .eml for the invitation (the resend overwrote it).
    """
    outbox = make_mailer(settings)
    assert isinstance(outbox, OutboxMailer)
    invitation_id = add_user(engine)
    with pytest.raises(WorkerDied):
        send_one(engine, DiesAfterAcceptance(outbox), settings, invitation_id, now=clock)

    clock.advance(CLAIM_LEASE.total_seconds() + 1)
    assert send_one(engine, outbox, settings, invitation_id, now=clock) == "sent"

    assert [path.name for path in (settings.var_dir / "outbox").iterdir()] == [
        outbox.path_for(message_id("t1", "u1")).name
    ]


def test_due_invitations_are_pending_or_abandoned_rows(engine):
    """Given invitations in every state, When the sweep asks which are due at T0+2min,
    Then it gets pending rows never or long ago enqueued and sending rows whose lease expired — nothing else;
    after mark_enqueued, none of them until the grace has passed; then those and the rows that aged meanwhile.
    """
    now = T0 + timedelta(minutes=2)
    due = {
        add_user(engine, user_id="never_enqueued", enqueued_at=None),
        add_user(engine, user_id="enqueued_long_ago", enqueued_at=now - timedelta(minutes=2)),
        add_user(engine, user_id="abandoned", status="sending", claimed_at=now - timedelta(seconds=61),
                 enqueued_at=now - timedelta(seconds=61)),
    }
    not_yet = {
        add_user(engine, user_id="just_enqueued", enqueued_at=now - timedelta(seconds=10)),
        add_user(engine, user_id="being_sent", status="sending", claimed_at=now - timedelta(seconds=10),
                 enqueued_at=now - timedelta(seconds=70)),
    }
    add_user(engine, user_id="sent", status="sent", sent_at=T0, enqueued_at=None)
    add_user(engine, user_id="failed", status="failed", error="550", enqueued_at=None)

    with session_scope(engine) as session:
        found = due_invitations(session, now)
        assert len(due_invitations(session, now, limit=2)) == 2
        mark_enqueued(session, found, now)
    with session_scope(engine) as session:
        again = due_invitations(session, now + timedelta(seconds=30))
        later = due_invitations(session, now + timedelta(seconds=61))

    assert set(found) == due and len(found) == 3
    assert again == []
    assert set(later) == due | not_yet


# -- batches: one claim, one record, per-row outcomes ------------------------------


class Ticking:
    """A mailer that takes ``seconds`` of the test clock per message (a slow server, or just distinct times)."""

    def __init__(self, mailer, clock: Clock, seconds: float, *, die_after: int | None = None) -> None:
        self.mailer, self.clock, self.seconds, self.die_after = mailer, clock, seconds, die_after
        self.sent = 0

    def send(self, msg) -> None:
        self.clock.advance(self.seconds)
        self.mailer.send(msg)
        self.sent += 1
        if self.sent == self.die_after:
            raise WorkerDied


def add_users(engine: Engine, count: int, **invitation: object) -> list[str]:
    return [add_user(engine, user_id=f"u{n}", address=f"user{n}@acme.example", **invitation) for n in range(count)]


def statuses(engine: Engine, ids: list[str]) -> list[tuple[str, int]]:
    return [(invitation.status, invitation.attempts) for invitation, _ in (load(engine, i) for i in ids)]


class Statements:
    """Counts the UPDATE statements the database receives, by table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.updates: list[str] = []

    def __enter__(self) -> "Statements":
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc_info: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany) -> None:
        words = statement.split()
        if words[:1] == ["UPDATE"]:
            self.updates.append(words[1])


def test_a_batch_is_claimed_in_one_statement_and_recorded_in_one_commit(engine, settings, smtp, mailer, clock):
    """Given five pending invitations, When one job sends them as a batch (10 ms apart),
    Then five mails arrive over one SMTP session, the rows were claimed by one UPDATE and recorded
    by one more (plus one for the accounts), and each invited_at is the moment its own mail was accepted.
    """
    ids = add_users(engine, 5)

    with Statements(engine) as seen:
        result = send_invitations(engine, Ticking(mailer, clock, 0.01), settings, ids, now=clock)

    assert result.outcomes == dict.fromkeys(ids, "sent") and result.error is None
    assert smtp.message_ids() == [message_id("t1", f"u{n}") for n in range(5)]
    assert smtp.connections == 1
    assert seen.updates == ["invitation", "invitation", "account"]
    for n, invitation_id in enumerate(ids):
        invitation, account = load(engine, invitation_id)
        accepted = T0 + timedelta(seconds=0.01 * (n + 1))
        assert (invitation.status, invitation.attempts) == ("sent", 1)
        assert aware(invitation.sent_at) == aware(account.invited_at) == accepted


def test_a_refused_recipient_fails_only_its_own_row(engine, settings, smtp, mailer, clock):
    """Given a batch of three where the server refuses the second recipient with 550,
    When the job runs, Then that row is failed with the reply as its invite_error and the
    other two are sent; the job does not ask for a retry.
    """
    ids = add_users(engine, 3)
    refuse_second = Before(mailer, {2: lambda: smtp.fail_next(1, "550 5.1.1 <user1@acme.example>: User unknown",
                                                               at="RCPT")})

    result = send_invitations(engine, refuse_second, settings, ids, now=clock)

    assert result.outcomes == {ids[0]: "sent", ids[1]: "failed", ids[2]: "sent"} and result.error is None
    assert smtp.message_ids() == [message_id("t1", "u0"), message_id("t1", "u2")]
    refused, account = load(engine, ids[1])
    assert refused.status == "failed" and "550 5.1.1" in refused.error
    assert account.invite_error == refused.error and account.invited_at is None
    assert [load(engine, i)[1].invited_at is not None for i in ids] == [True, False, True]


class Before:
    """A mailer that runs ``actions[n]`` just before its n-th message (1-based): a fault injected mid-batch."""

    def __init__(self, mailer, actions: dict) -> None:
        self.mailer, self.actions, self.count = mailer, actions, 0

    def send(self, msg) -> None:
        self.count += 1
        if self.count in self.actions:
            self.actions[self.count]()
        self.mailer.send(msg)


def test_a_transient_failure_mid_batch_records_the_sent_and_releases_the_rest(engine, settings, smtp, mailer, clock):
    """Given a batch of five and a server that answers 421 to every attempt at the third mail,
    When the job runs, Then the first two are recorded as sent, the third is pending again with
    the reply as its error, the last two are pending with their claim's attempt given back, and the
    job returns the transient error (for Dramatiq's retry);
    When the retry runs after the server recovered, Then the first two are already done and
    the other three are sent: every Message-ID arrived exactly once.
    """
    ids = add_users(engine, 5)
    fails_third = Before(mailer, {3: lambda: smtp.fail_next(3, "421 4.3.2 Shutting down")})

    result = send_invitations(engine, fails_third, settings, ids, now=clock)

    assert isinstance(result.error, TransientMailError)
    assert result.outcomes == {ids[0]: "sent", ids[1]: "sent", ids[2]: "retry", ids[3]: "retry", ids[4]: "retry"}
    assert statuses(engine, ids) == [("sent", 1), ("sent", 1), ("pending", 1), ("pending", 0), ("pending", 0)]
    assert "421 4.3.2" in load(engine, ids[2])[0].error
    assert [load(engine, i)[1].invited_at is not None for i in ids] == [True, True, False, False, False]

    clock.advance(5)
    again = send_invitations(engine, mailer, settings, ids, now=clock)

    assert again.error is None
    assert again.outcomes == {ids[0]: "already_done", ids[1]: "already_done", ids[2]: "sent", ids[3]: "sent",
                              ids[4]: "sent"}
    assert sorted(smtp.message_ids()) == sorted(message_id("t1", f"u{n}") for n in range(5))
    assert statuses(engine, ids) == [("sent", 1), ("sent", 1), ("sent", 2), ("sent", 1), ("sent", 1)]


def test_a_deferred_recipient_does_not_hold_back_the_others(engine, settings, smtp, mailer, clock):
    """Given a batch of three where the server defers the first recipient (451 at RCPT, greylisting) on
    every attempt, When the job runs, Then the other two are sent, only the deferred row is released,
    and the job still returns the transient error so Dramatiq retries it.
    """
    ids = add_users(engine, 3)
    smtp.fail_next(3, "451 4.7.1 Greylisted, try again later", at="RCPT")

    result = send_invitations(engine, mailer, settings, ids, now=clock)

    assert isinstance(result.error, TransientMailError) and result.error.code == 451
    assert result.outcomes == {ids[0]: "retry", ids[1]: "sent", ids[2]: "sent"}
    assert smtp.message_ids() == [message_id("t1", "u1"), message_id("t1", "u2")]
    assert statuses(engine, ids) == [("pending", 1), ("sent", 1), ("sent", 1)]
    assert smtp.connections == 1, "a deferred recipient does not cost the connection"


def test_recipients_deferred_in_a_row_stop_the_batch(engine, settings, smtp, mailer, clock):
    """Given a batch of five and a server that defers every recipient (451 at RCPT: its own trouble),
    When the job runs, Then it stops after DEFERRED_IN_A_ROW deferrals instead of trying each
    recipient in turn, and every row is pending again for the job's retry (the untried ones with
    their attempt given back).
    """
    ids = add_users(engine, 5)
    smtp.fail_next(3 * DEFERRED_IN_A_ROW, "451 4.3.0 Temporary local problem", at="RCPT")

    result = send_invitations(engine, mailer, settings, ids, now=clock)

    assert isinstance(result.error, TransientMailError)
    assert result.outcomes == dict.fromkeys(ids, "retry")
    tried = [("pending", 1)] * DEFERRED_IN_A_ROW
    assert statuses(engine, ids) == tried + [("pending", 0)] * (5 - DEFERRED_IN_A_ROW)
    assert smtp.rcpt_attempts == 3 * DEFERRED_IN_A_ROW and smtp.messages == []


def test_a_batch_with_an_id_already_sent_mails_only_the_others(engine, settings, smtp, mailer, clock):
    """Given one invitation already sent and two pending, When a batch with all three runs
    (and names an unknown id and one id twice), Then the sent one is already_done with no second
    mail, and the two others are sent once each.
    """
    ids = add_users(engine, 3)
    assert send_one(engine, mailer, settings, ids[1], now=clock) == "sent"

    result = send_invitations(engine, mailer, settings, [*ids, "no-such-invitation", ids[0]], now=clock)

    assert result.outcomes == {ids[0]: "sent", ids[1]: "already_done", ids[2]: "sent",
                               "no-such-invitation": "already_done"}
    assert sorted(smtp.message_ids()) == sorted(message_id("t1", f"u{n}") for n in range(3))
    assert statuses(engine, ids) == [("sent", 1), ("sent", 1), ("sent", 1)]


def test_a_batch_on_a_slow_server_hands_back_what_its_claim_cannot_cover(engine, settings, smtp, mailer, clock):
    """Given a batch of five and a server that takes 6 s per message, When the job runs,
    Then it starts no send later than SEND_BUDGET after its claim (so every send ends inside the lease):
    three are sent, the last two are postponed (pending, attempt given back, due for a new job at once).
    """
    ids = add_users(engine, 5)

    result = send_invitations(engine, Ticking(mailer, clock, 6), settings, ids, now=clock)

    assert SEND_BUDGET < timedelta(seconds=18) < CLAIM_LEASE
    assert result.error is None
    assert list(result.outcomes.values()) == ["sent", "sent", "sent", "postponed", "postponed"]
    assert result.ids("postponed") == ids[3:]
    assert statuses(engine, ids) == [("sent", 1)] * 3 + [("pending", 0)] * 2
    assert send_invitations(engine, mailer, settings, result.ids("postponed"), now=clock).outcomes == dict.fromkeys(
        ids[3:], "sent")
    assert len(smtp.messages) == 5


def test_a_worker_killed_mid_batch_on_a_slow_server_leaves_one_mail_unrecorded(engine, settings, smtp, mailer, clock):
    """Given a batch of five on a server that takes 200 ms per message, When the worker is killed right
    after the server accepted the third, Then the first two were recorded before it (RECORD_EVERY), the
    third is the one in the resend window, and the last two, claimed but never sent, wait for the lease.
    """
    ids = add_users(engine, 5)

    with pytest.raises(WorkerDied):
        send_invitations(engine, Ticking(mailer, clock, 0.2, die_after=3), settings, ids, now=clock)

    assert RECORD_EVERY <= timedelta(seconds=0.2)
    assert [status for status, _ in statuses(engine, ids)] == ["sent", "sent", "sending", "sending", "sending"]
    assert len(smtp.messages) == 3

    clock.advance(CLAIM_LEASE.total_seconds())
    with session_scope(engine) as session:
        assert sorted(due_invitations(session, clock())) == sorted(ids[2:])
    assert send_invitations(engine, mailer, settings, ids, now=clock).outcomes == {
        ids[0]: "already_done", ids[1]: "already_done", ids[2]: "sent", ids[3]: "sent", ids[4]: "sent"}
    assert sorted(smtp.message_ids()) == sorted(
        [message_id("t1", f"u{n}") for n in range(5)] + [message_id("t1", "u2")]), "only the third twice"


def test_batches_split_ids_for_the_worker_threads():
    """Given ids to send, When they are split into messages, Then no message exceeds BATCH_SIZE and a small
    burst still makes one message per worker thread (a slow mail server keeps every thread busy)."""
    ids = [f"i{n}" for n in range(1000)]

    assert [len(batch) for batch in batches(ids, spread=8)] == [BATCH_SIZE] * 10
    assert [len(batch) for batch in batches(ids[:20], spread=8)] == [3] * 6 + [2]
    assert [len(batch) for batch in batches(ids[:5], spread=8)] == [1] * 5
    assert list(batches([], spread=8)) == []
    assert [x for batch in batches(ids[:250], spread=8) for x in batch] == ids[:250]


# -- the actor and the sweep, on a StubBroker with a Dramatiq worker ----------------


class Sent(Middleware):
    """Keeps the messages enqueued without a delay (not Dramatiq's retries)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def after_enqueue(self, broker, message, delay) -> None:
        if not delay:
            self.messages.append(message)


@dataclasses.dataclass
class Jobs:
    broker: StubBroker
    actors: Any
    rt: runtime.Runtime
    sent: Sent

    def drain(self) -> None:
        drain(self.broker, QUEUES)

    def counts(self) -> dict[str, int]:
        return {outcome: n for (actor, outcome), n in self.rt.telemetry.jobs().items() if actor == "send_invitation"}


@pytest.fixture
def jobs(engine, settings, mailer, redis_client, base_settings) -> Iterator[Jobs]:
    """The real send_invitation actor (and the sweep) over this test's database, SMTP server and Redis."""
    broker = StubBroker()
    broker.add_middleware(CurrentMessage())
    sent = Sent()
    broker.add_middleware(sent)
    actors = bind_actors(broker)
    namespace = f"{base_settings.redis_namespace}inv{uuid.uuid4().hex[:8]}"
    rt = runtime.Runtime(
        settings=dataclasses.replace(settings, redis_namespace=namespace), engine=engine, redis=redis_client,
        waker=Waker(broker, redis_client, namespace), gateway=LedgerGateway(), mailer=mailer,
        telemetry=Telemetry(redis_client, namespace),
    )
    runtime.install(rt)
    worker = Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    try:
        yield Jobs(broker, actors, rt, sent)
    finally:
        worker.stop()
        broker.close()


def test_an_old_single_id_message_still_works(engine, smtp, jobs):
    """Given a send_invitation message as workers enqueued it before batching (one id in args),
    When a worker takes it, Then the invitation is sent and counted once as sent.
    """
    invitation_id = add_user(engine)

    jobs.broker.enqueue(Message(queue_name="invitations", actor_name="send_invitation",
                                args=(invitation_id,), kwargs={}, options={}))
    jobs.drain()

    assert smtp.message_ids() == [message_id("t1", "u1")]
    assert load(engine, invitation_id)[0].status == "sent"
    assert jobs.counts() == {"sent": 1}


def test_the_actor_retries_a_batch_after_a_transient_failure(engine, smtp, mailer, jobs):
    """Given a batch job of five and a server that answers 421 to every attempt at the third mail,
    When a worker runs it, Then Dramatiq retries the job, narrowed to the three it gave back (the two
    sent are no longer its own), and every Message-ID arrives exactly once; the metrics count each
    invitation by outcome.
    """
    ids = add_users(engine, 5)
    jobs.rt.mailer = Before(mailer, {3: lambda: smtp.fail_next(3, "421 4.3.2 Shutting down")})

    jobs.actors.send_invitation.send(*ids)
    jobs.drain()

    assert sorted(smtp.message_ids()) == sorted(message_id("t1", f"u{n}") for n in range(5))
    assert [status for status, _ in statuses(engine, ids)] == ["sent"] * 5
    assert jobs.counts() == {"sent": 5, "retry": 3, "error": 1}


def test_the_last_retry_gives_up_the_rows_left_and_keeps_the_sent(engine, smtp, mailer, jobs):
    """Given a batch job on its last retry and a server that answers 421 at the third mail,
    When it fails, Then the first two stay sent and the three others are failed with the reason
    the admin sees (no invited_at); nothing stays pending.
    """
    from workers.actors import INVITE_RETRIES

    ids = add_users(engine, 5)
    jobs.rt.mailer = Before(mailer, {3: lambda: smtp.fail_next(3, "421 4.3.2 Shutting down")})

    jobs.actors.send_invitation.send_with_options(args=tuple(ids), retries=INVITE_RETRIES)
    jobs.drain()

    assert [status for status, _ in statuses(engine, ids)] == ["sent", "sent", "failed", "failed", "failed"]
    for invitation_id in ids[2:]:
        account = load(engine, invitation_id)[1]
        assert account.invited_at is None
        assert account.invite_error.startswith(f"gave up after {INVITE_RETRIES + 1} attempts: ")
        assert "421 4.3.2" in account.invite_error
    assert len(smtp.messages) == 2
    # Dramatiq gave the message up (a dead letter, as any job past its last retry), narrowed to the
    # three ids it still owned; its on_retry_exhausted callback failed those and nothing else.
    [letter] = jobs.broker.dead_letters
    assert letter.actor_name == "send_invitation" and letter.options[OWNED_IDS] == ids[2:]
    assert jobs.counts()["given_up"] == 3


def test_an_operator_retry_of_the_given_up_job_sends_what_it_gave_up_once(engine, smtp, mailer, jobs):
    """Given a batch job given up on its last retry (two sent, three failed, a dead letter)
    When the mail server is back and the operator retries the dead letter (`sally-scim jobs retry`),
    Then the three failed invitations are sent, once each, and their accounts show invited_at and no error;
    the two sent earlier are not sent again; and re-queueing the same dead letter once more sends nothing."""
    from workers.actors import INVITE_RETRIES

    ids = add_users(engine, 5)
    jobs.rt.mailer = Before(mailer, {3: lambda: smtp.fail_next(3, "421 4.3.2 Shutting down")})
    jobs.actors.send_invitation.send_with_options(args=tuple(ids), retries=INVITE_RETRIES)
    jobs.drain()
    letter = jobs.broker.dead_letters[0]._message  # the stub broker keeps the Message in a proxy
    assert [status for status, _ in statuses(engine, ids)] == ["sent", "sent", "failed", "failed", "failed"]

    retried = requeued(letter)
    assert retried.options[OPERATOR_RETRY] is True and "retries" not in retried.options
    jobs.broker.enqueue(retried)
    jobs.drain()
    assert [status for status, _ in statuses(engine, ids)] == ["sent"] * 5
    assert sorted(smtp.message_ids()) == sorted(message_id("t1", f"u{n}") for n in range(5))
    for invitation_id in ids[2:]:
        account = load(engine, invitation_id)[1]
        assert account.invited_at is not None and account.invite_error is None

    jobs.broker.enqueue(requeued(letter))
    jobs.drain()
    assert len(smtp.messages) == 5


def test_the_give_up_fails_only_what_the_message_still_owns(engine, jobs):
    """Given a batch message of three whose earlier attempt gave back only the first id (the other two
    were postponed into a new message and are pending again), When Dramatiq's retries are spent and the
    on_retry_exhausted callback runs, Then only the first is failed; the other two stay pending, untouched.
    """
    ids = add_users(engine, 3)
    message = {"queue_name": "invitations", "actor_name": "send_invitation", "args": ids, "kwargs": {},
               "options": {"retries": 8, OWNED_IDS: ids[:1], LAST_ERROR: "the mail server deferred the recipient"}}

    jobs.actors.give_up_invitations(message, {"retries": 8, "max_retries": 8})

    assert statuses(engine, ids) == [("failed", 0), ("pending", 0), ("pending", 0)]
    account = load(engine, ids[0])[1]
    assert account.invite_error == "gave up after 9 attempts: the mail server deferred the recipient"
    assert [load(engine, invitation_id)[1].invite_error for invitation_id in ids[1:]] == [None, None]


def test_a_message_from_before_narrowing_gives_up_its_pending_ids_only(engine, clock, jobs):
    """Given a send_invitation message that carries no owned ids (enqueued before this version) and
    whose ids are sent, pending, and waiting for a later day under the daily cap,
    When its retries are spent, Then only the pending row whose day has come is failed.
    """
    ids = add_users(engine, 3)
    with session_scope(engine) as session:
        session.execute(update(Invitation).where(Invitation.id == ids[0]).values(status="sent", sent_at=clock()))
        session.execute(update(Invitation).where(Invitation.id == ids[2]).values(send_day=datetime.now(timezone.utc) + timedelta(days=2)))
    message = {"queue_name": "invitations", "actor_name": "send_invitation", "args": ids, "kwargs": {},
               "options": {"retries": 8}}

    jobs.actors.give_up_invitations(message, {"retries": 8, "max_retries": 8})

    assert [status for status, _ in statuses(engine, ids)] == ["sent", "failed", "pending"]
    assert load(engine, ids[1])[1].invite_error == "gave up after 9 attempts: unknown error"


def test_a_last_attempt_that_postpones_gives_up_only_the_deferred_row(engine, smtp, mailer, jobs, monkeypatch):
    """Given a batch of three on its last retry, whose first recipient is deferred and after which the
    claim's send budget is spent (a slow server), When the job runs, Then the two untried rows go out in
    a new message and are sent, and only the deferred one is given up, with the server's reply as reason.
    """
    import workers.invitations as module
    from workers.actors import INVITE_RETRIES

    class DefersTheFirstThenIsSlow:
        def __init__(self) -> None:
            self.count = 0

        def send(self, mail) -> None:
            self.count += 1
            if self.count == 1:
                monkeypatch.setattr(module, "SEND_BUDGET", timedelta(seconds=-1))  # spent from now on
                raise RecipientDeferredError("the mail server deferred the recipient: 451 4.7.1 greylisted",
                                             code=451)
            mailer.send(mail)

    class BudgetBackForTheNewMessage(Middleware):
        def after_enqueue(self, broker, message, delay) -> None:
            if message.actor_name == "send_invitation" and not delay:
                monkeypatch.setattr(module, "SEND_BUDGET", SEND_BUDGET)

    jobs.broker.add_middleware(BudgetBackForTheNewMessage())
    ids = add_users(engine, 3)
    jobs.rt.mailer = DefersTheFirstThenIsSlow()

    jobs.actors.send_invitation.send_with_options(args=tuple(ids), retries=INVITE_RETRIES)
    jobs.drain()

    assert [status for status, _ in statuses(engine, ids)] == ["failed", "sent", "sent"]
    assert sorted(smtp.message_ids()) == sorted(message_id("t1", f"u{n}") for n in (1, 2))
    assert "gave up after" in load(engine, ids[0])[1].invite_error and "451 4.7.1" in load(engine, ids[0])[1].invite_error
    [letter] = jobs.broker.dead_letters
    assert letter.options[OWNED_IDS] == ids[:1]
    assert [m.args for m in jobs.sent.messages if m.actor_name == "send_invitation"] == [tuple(ids), tuple(ids[1:])]


def test_the_sweep_resends_due_invitations_in_batches(engine, smtp, jobs):
    """Given 20 pending invitations whose messages were lost, When the sweep runs,
    Then it sends them in batches spread over the worker threads (never one message per id),
    and every invitation is sent once.
    """
    ids = add_users(engine, 20, enqueued_at=None)

    swept = Sweeper(jobs.rt).run_once()
    jobs.drain()

    assert swept["invitations"] == 20
    batches_sent = [message.args for message in jobs.sent.messages if message.actor_name == "send_invitation"]
    assert sorted(len(args) for args in batches_sent) == [2] + [3] * 6
    assert sorted(i for args in batches_sent for i in args) == sorted(ids)
    assert len(smtp.messages) == 20 and [s for s, _ in statuses(engine, ids)] == ["sent"] * 20
