"""The invitation protocol: claim, send outside the transaction, record — against real SMTP and a SQLite file.

DESIGN.md "Invitations are at-least-once, made duplicate-safe": the row is
claimed before sending; every (re)send carries the Message-ID derived from
tenant and user; a resend only happens when a worker dies between the mail
server's acceptance and the commit that records it. CONTRACT.md "Invitations":
``invited_at`` is when the mail server accepted the message.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from models.db import make_engine, session_scope
from models.migrate import upgrade
from models.settings import Settings
from models.tables import Account, Invitation, ScimUser, Tenant
from tests.workers.test_mailer import FakeSmtp
from workers.invitations import CLAIM_LEASE, due_invitations, give_up, mark_enqueued, send_invitation
from workers.mailer import OutboxMailer, SmtpMailer, TransientMailError, make_mailer, message_id

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
def engine(tmp_path: Path):
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
def smtp():
    with FakeSmtp() as server:
        yield server


@pytest.fixture
def mailer(smtp):
    with SmtpMailer(smtp.url, timeout=5, attempts=3, wait_seconds=0.01) as mailer:
        yield mailer


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

    outcome = send_invitation(engine, mailer, settings, invitation_id, now=clock)

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
    send_invitation(engine, mailer, settings, invitation_id, now=clock)

    assert send_invitation(engine, mailer, settings, invitation_id, now=clock) == "already_done"
    assert len(smtp.messages) == 1


def test_a_claim_held_by_another_worker_is_respected(engine, settings, smtp, mailer, clock):
    """Given worker A is in the middle of sending, When worker B runs the same job,
    Then B answers claimed_elsewhere without mailing, and A's mail is the only one.
    """
    invitation_id = add_user(engine)
    outcomes: list[str] = []

    class SecondWorkerDuringSend:
        def send(self, msg) -> None:
            outcomes.append(send_invitation(engine, mailer, settings, invitation_id, now=clock))
            mailer.send(msg)

    assert send_invitation(engine, SecondWorkerDuringSend(), settings, invitation_id, now=clock) == "sent"
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
        outcomes.append(send_invitation(engine, mailer, settings, invitation_id))

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
        send_invitation(engine, DiesAfterAcceptance(mailer), settings, invitation_id, now=clock)
    assert load(engine, invitation_id)[0].status == "sending"

    clock.advance(30)
    assert send_invitation(engine, mailer, settings, invitation_id, now=clock) == "claimed_elsewhere"
    with session_scope(engine) as session:
        assert due_invitations(session, clock()) == []

    clock.advance(CLAIM_LEASE.total_seconds())
    with session_scope(engine) as session:
        assert due_invitations(session, clock()) == [invitation_id]
    assert send_invitation(engine, mailer, settings, invitation_id, now=clock) == "sent"

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

    assert send_invitation(engine, mailer, settings, invitation_id, now=clock) == "sent"
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
        send_invitation(engine, mailer, settings, invitation_id, now=clock)

    invitation, account = load(engine, invitation_id)
    assert (invitation.status, invitation.claimed_at, invitation.attempts) == ("pending", None, 1)
    assert "451 4.3.0 Queue full" in invitation.error
    assert account.invited_at is None and account.invite_error is None

    clock.advance(5)
    assert send_invitation(engine, mailer, settings, invitation_id, now=clock) == "sent"
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
        send_invitation(engine, mailer, settings, invitation_id, now=clock)

    assert give_up(engine, invitation_id, "gave up after 5 retries") is True

    invitation, account = load(engine, invitation_id)
    assert invitation.status == "failed"
    assert account.invite_error.startswith("gave up after 5 retries (last error: ")
    assert "421 4.3.2 Shutting down" in account.invite_error
    assert send_invitation(engine, mailer, settings, invitation_id, now=clock) == "already_done"
    assert smtp.messages == []


def test_give_up_leaves_a_sent_or_sending_row_alone(engine, clock):
    """Given one invitation sent and one claimed by a live worker, When give_up runs for both,
    Then neither changes: only a pending row can be given up.
    """
    sent = add_user(engine, user_id="u1", status="sent", sent_at=T0)
    sending = add_user(engine, user_id="u2", status="sending", claimed_at=T0)

    assert give_up(engine, sent, "late") is False
    assert give_up(engine, sending, "late") is False
    assert load(engine, sent)[0].status == "sent"
    assert load(engine, sending)[0].status == "sending"


def test_a_550_fails_the_invitation_without_retry(engine, settings, smtp, mailer, clock):
    """Given the server refuses the recipient with 550, When the job runs,
    Then it answers failed after one attempt, the account's invite_error shows the reply,
    invited_at stays null, and running the job again sends nothing.
    """
    invitation_id = add_user(engine)
    smtp.fail_next(1, "550 5.1.1 <zoe@acme.example>: Recipient address rejected", at="RCPT")

    assert send_invitation(engine, mailer, settings, invitation_id, now=clock) == "failed"
    assert send_invitation(engine, mailer, settings, invitation_id, now=clock) == "already_done"

    assert smtp.rcpt_attempts == 1
    assert smtp.messages == []
    invitation, account = load(engine, invitation_id)
    assert invitation.status == "failed" and "550 5.1.1" in invitation.error
    assert account.invited_at is None
    assert account.invite_error == invitation.error


def test_a_row_without_address_fails_without_mailing(engine, settings, smtp, mailer, clock):
    """Given an invitation row with no address, When the job runs, Then it fails with a reason and nothing is sent."""
    invitation_id = add_user(engine, address=None)

    assert send_invitation(engine, mailer, settings, invitation_id, now=clock) == "failed"
    assert load(engine, invitation_id)[1].invite_error == "the user has no email address to invite"
    assert smtp.connections == 0


def test_fifty_invitations_share_one_smtp_connection(engine, settings, smtp, mailer, clock):
    """Given 50 pending invitations, When one worker thread sends them all,
    Then 50 distinct Message-IDs arrive over one SMTP session.
    """
    ids = [add_user(engine, user_id=f"u{n}", address=f"user{n}@acme.example") for n in range(50)]

    outcomes = [send_invitation(engine, mailer, settings, invitation_id, now=clock) for invitation_id in ids]

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
        send_invitation(engine, DiesAfterAcceptance(outbox), settings, invitation_id, now=clock)

    clock.advance(CLAIM_LEASE.total_seconds() + 1)
    assert send_invitation(engine, outbox, settings, invitation_id, now=clock) == "sent"

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
