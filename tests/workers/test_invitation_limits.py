"""Invitations: one per address per tenant, a daily cap per tenant, a bounded greeting — real SMTP, real DB."""

from __future__ import annotations

import email.policy
from datetime import datetime, timedelta, timezone
from email import message_from_bytes

import pytest
from sqlalchemy import select
from sqlmodel import Session

from billing.gateway import LedgerGateway
from models.directory.groups import create_group
from models.directory.users import create_user
from models.settings import Settings
from models.tables import Invitation
from tests.fakes.smtp_server import FakeSmtp
from tests.workers.support import build_invitation, make_group, make_user, users_by_name
from workers.invitations import ENQUEUE_GRACE, due_invitations, send_invitations
from workers.mail.message import message_id
from workers.mail.transport import OutboxMailer, SmtpMailer
from workers.reconcile import Reconciler

USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def reconcile(engine, tenant_id: str, settings: Settings | None = None, clock=None) -> list[str]:
    """Apply every event; the invitation ids to send now."""
    reconciler = Reconciler(engine, LedgerGateway(), settings=settings, **({"clock": clock} if clock else {}))
    ids: list[str] = []
    for _ in range(10):
        result = reconciler.run(tenant_id)
        ids += result.invitation_ids
        if not result.more:
            return ids
    raise AssertionError("reconcile did not settle")


def save_mapping(admin, tenant_id: str, group: str, **extra) -> dict:
    response = admin.put(f"/tenants/{tenant_id}/scim/config",
                         json={"user_groups": [group], "auto_invite": True, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_recreated_user_with_an_invited_address_is_not_mailed_again(admin, tenant, engine):
    """Given auto-invite and a user whose invitation the mail server accepted,
    When the IdP deletes the user and creates it again (new id, same address in another case),
    Then no second invitation is queued or mailed; the new user shows the first invitation's moment.
    """
    settings = Settings(public_base_url="https://sally.example")
    ada = make_user(tenant.client, "ada@acme.example")
    group = make_group(tenant.client, "Users", [ada])
    save_mapping(admin, tenant.tenant_id, group)
    with FakeSmtp() as smtp, SmtpMailer(smtp.url, timeout=5, attempts=1) as mailer:
        first = reconcile(engine, tenant.tenant_id)
        assert send_invitations(engine, mailer, settings, first).counts() == {"sent": 1}

        assert tenant.client.delete(f"/Users/{ada}").status_code == 204
        again = tenant.client.post("/Users", json={"schemas": [USER], "userName": "ADA@acme.example",
                                                   "emails": [{"value": "Ada@Acme.example", "primary": True}]})
        assert again.status_code == 201, again.text
        patched = tenant.client.patch(f"/Groups/{group}", json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "add", "path": "members", "value": [{"value": again.json()["id"]}]}],
        })
        assert patched.status_code in (200, 204), patched.text
        second = reconcile(engine, tenant.tenant_id)

        assert second == []
        assert len(smtp.messages) == 1
    with engine.connect() as connection:
        assert connection.execute(select(Invitation.user_id)).scalars().all() == [ada]
    rows = users_by_name(admin, tenant.tenant_id)
    assert rows["ADA@acme.example"]["status"] == "active"
    assert rows["ADA@acme.example"]["invited_at"] == rows["ada@acme.example"]["invited_at"] is not None


def test_two_users_with_one_address_get_one_invitation(admin, tenant, engine):
    """Given two users of one tenant sharing an address (in different case), When both gain access at once,
    Then one invitation is queued for that address."""
    one = make_user(tenant.client, "shared@acme.example")
    other = tenant.client.post("/Users", json={"schemas": [USER], "userName": "other-login",
                                               "emails": [{"value": "SHARED@acme.example"}]}).json()["id"]
    save_mapping(admin, tenant.tenant_id, make_group(tenant.client, "Users", [one, other]))

    assert len(reconcile(engine, tenant.tenant_id)) == 1
    with engine.connect() as connection:
        assert connection.execute(select(Invitation.address)).scalars().all() == ["shared@acme.example"]


def test_past_the_daily_cap_invitations_wait_for_the_next_day_with_a_reason(admin, tenant, engine):
    """Given a tenant whose daily invitation cap is 2 (its config overrides the default),
    When 5 users gain access at once, Then 2 invitations go out today; the other 3 wait with a reason
    naming the cap and the day in the admin's user list (and as waiting, not pending, in …/sync);
    they are neither claimed nor re-sent by the sweep before their day; the next day 2 go out, the last the day after.
    """
    ids = [make_user(tenant.client, f"u{i}@acme.example") for i in range(5)]
    config = save_mapping(admin, tenant.tenant_id, make_group(tenant.client, "Users", ids), invite_daily_cap=2)
    assert config["invite_daily_cap"] == 2 and config["effective"]["invite_daily_cap"] == 2
    now = datetime.now(timezone.utc)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    settings = Settings(public_base_url="https://sally.example")

    due_now = reconcile(engine, tenant.tenant_id, clock=lambda: now)

    assert len(due_now) == 2
    rows = users_by_name(admin, tenant.tenant_id)
    waiting = sorted(row["invite_waiting"] for row in rows.values() if row["invite_waiting"])
    tomorrow, day_after = (today + timedelta(days=1)).date(), (today + timedelta(days=2)).date()
    assert waiting == [
        f"Daily invitation limit reached (2 per day for this tenant): sent on {tomorrow} (UTC).",
        f"Daily invitation limit reached (2 per day for this tenant): sent on {tomorrow} (UTC).",
        f"Daily invitation limit reached (2 per day for this tenant): sent on {day_after} (UTC).",
    ]
    sync = admin.get(f"/tenants/{tenant.tenant_id}/sync").json()
    assert (sync["pending_invitations"], sync["waiting_invitations"]) == (2, 3)
    with engine.connect() as connection:
        all_ids = connection.execute(select(Invitation.id)).scalars().all()
    later = sorted(set(all_ids) - set(due_now))

    with FakeSmtp() as smtp, SmtpMailer(smtp.url, timeout=5, attempts=1) as mailer:
        today_result = send_invitations(engine, mailer, settings, all_ids, now=lambda: now)
        assert today_result.counts() == {"sent": 2, "waiting": 3}
        with Session(engine) as session:
            assert due_invitations(session, now + timedelta(hours=1)) == []
            next_day = due_invitations(session, today + timedelta(days=1, minutes=5))
            assert len(next_day) == 2 and set(next_day) <= set(later)
            assert sorted(due_invitations(session, today + timedelta(days=2, minutes=5))) == later
        tomorrow_result = send_invitations(engine, mailer, settings, later,
                                           now=lambda: today + timedelta(days=1, minutes=5))
        assert tomorrow_result.counts() == {"sent": 2, "waiting": 1}
        assert len(smtp.messages) == 4
    assert sum(1 for row in users_by_name(admin, tenant.tenant_id).values() if row["invite_waiting"]) == 1


def test_raising_the_daily_cap_sends_the_waiting_invitations_today(admin, tenant, engine):
    """Given 5 invitations under a cap of 2 (3 waiting for later days), When the admin raises the cap to 4,
    Then after the reconcile of that change 2 more are due today and one still waits (for tomorrow)."""
    ids = [make_user(tenant.client, f"r{i}@acme.example") for i in range(5)]
    group = make_group(tenant.client, "Users", ids)
    save_mapping(admin, tenant.tenant_id, group, invite_daily_cap=2)
    assert len(reconcile(engine, tenant.tenant_id)) == 2

    save_mapping(admin, tenant.tenant_id, group, invite_daily_cap=4)
    due = reconcile(engine, tenant.tenant_id)

    assert len(due) == 2
    waiting = [row["invite_waiting"] for row in users_by_name(admin, tenant.tenant_id).values() if row["invite_waiting"]]
    assert len(waiting) == 1 and "(4 per day for this tenant)" in waiting[0]
    sync = admin.get(f"/tenants/{tenant.tenant_id}/sync").json()
    assert (sync["pending_invitations"], sync["waiting_invitations"]) == (4, 1)


def test_the_default_daily_cap_comes_from_settings(admin, tenant, engine):
    """Given INVITE_DAILY_CAP=3 and a tenant that sets no cap of its own, When 4 users gain access,
    Then 3 invitations are due now and one waits."""
    ids = [make_user(tenant.client, f"d{i}@acme.example") for i in range(4)]
    save_mapping(admin, tenant.tenant_id, make_group(tenant.client, "Users", ids))
    settings = Settings.from_env({"INVITE_DAILY_CAP": "3"})

    assert len(reconcile(engine, tenant.tenant_id, settings=settings)) == 3
    assert sum(1 for row in users_by_name(admin, tenant.tenant_id).values() if row["invite_waiting"]) == 1


@pytest.mark.parametrize(
    "limits",
    [{"invite_daily_cap": 0}, {"invite_daily_cap": "10"}, {"invite_daily_cap": True},
     {"hold_percent": 101}, {"hold_percent": -1}, {"hold_min_users": 1.5}],
)
def test_invalid_limits_are_400_and_change_nothing(admin, tenant, limits):
    """Given a saved config, When the admin PUTs an out-of-range or mistyped limit, Then 400 and nothing changes."""
    group = make_group(tenant.client, "Users", [])
    saved = save_mapping(admin, tenant.tenant_id, group, invite_daily_cap=7)

    response = admin.put(f"/tenants/{tenant.tenant_id}/scim/config",
                         json={"user_groups": [group], **limits})

    assert response.status_code == 400 and response.json()["error"] == "invalid_body"
    assert admin.get(f"/tenants/{tenant.tenant_id}/scim/config").json() == saved


def test_the_greeting_uses_at_most_64_characters_of_a_name():
    """Given a 300-character display name, When the invitation is built,
    Then the greeting holds its first 64 characters and nothing more (the To field keeps the name)."""
    name = "Bartholomew " + "x" * 288
    mail = build_invitation(
        mail_from="Sally <no-reply@sally.example>", to_address="b@acme.example", display_name=name,
        tenant_name="Acme", login_url="https://sally.example", message_id=message_id("t1", "u1"),
    )

    received = message_from_bytes(mail.data, policy=email.policy.default)
    text = received.get_body(("plain",)).get_content()
    assert text.splitlines()[0] == f"Hello {name[:64]},"
    assert f"<p>Hello {name[:64]},</p>" in received.get_body(("html",)).get_content()


FIRST_SYNC_USERS = 10_000


def test_the_default_daily_cap_admits_a_first_sync_of_10000_users(admin, tenant, engine, tmp_path):
    """Given a deployment with the default INVITE_DAILY_CAP and a tenant that sets no cap of its own,
    When an IdP's first sync brings 10,000 users in one mapped group (auto-invite on),
    Then every one of them is due for an invitation today and none waits; the last 1,000 reach the outbox:
    CONTRACT says every user who gains access gets an invitation, and bench/burst.py is such a sync.
    """
    defaults = Settings.from_env({})
    assert defaults.invite_daily_cap == Settings().invite_daily_cap
    # The directory's own create paths (the SCIM API's, without 10,001 HTTP round trips).
    with Session(engine) as session:
        users = [create_user(session, tenant.tenant_id, {"userName": f"first{i}@acme.example"})
                 for i in range(FIRST_SYNC_USERS)]
        group = create_group(session, tenant.tenant_id, {"displayName": "Everyone"},
                             {user.id: "User" for user in users})
        session.commit()
        group_id = group.id
    save_mapping(admin, tenant.tenant_id, group_id)

    due = reconcile(engine, tenant.tenant_id, settings=defaults)

    assert len(due) == FIRST_SYNC_USERS
    sync = admin.get(f"/tenants/{tenant.tenant_id}/sync").json()
    assert (sync["pending_invitations"], sync["waiting_invitations"]) == (FIRST_SYNC_USERS, 0)
    with Session(engine) as session:
        # What the sweep sends today: every one of them (a held one would have a later send day).
        later = datetime.now(timezone.utc) + ENQUEUE_GRACE  # past the reconcile's own enqueue of them
        assert sorted(due_invitations(session, later, limit=2 * FIRST_SYNC_USERS)) == sorted(due)
    # Sending all 10,000 costs ~15 s of this machine's CPU and adds nothing the claim above does
    # not check: the outbox gets the last 1,000, all past the old default cap of 5,000.
    outbox = OutboxMailer(tmp_path / "outbox")
    last = due[-1000:]
    results = [send_invitations(engine, outbox, defaults, last[start:start + 500]).counts()
               for start in range(0, len(last), 500)]
    assert results == [{"sent": 500}, {"sent": 500}]
    assert len(list(outbox.directory.glob("*.eml"))) == 1000
