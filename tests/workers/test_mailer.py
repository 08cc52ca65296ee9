"""The invitation mail and the mailers, against a real SMTP server (aiosmtpd) on 127.0.0.1.

DESIGN.md "Retries at two levels" (tenacity around one SMTP exchange) and
"Invitations" (a Message-ID derived from tenant and user). Replies follow
RFC 5321 §4.2.1: 4yz is transient, 5yz is permanent.
"""

from __future__ import annotations

import email.policy
import logging
import threading
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path

import pytest

from models.settings import Settings
from tests.fakes.ports import free_port
from tests.fakes.smtp_server import FakeSmtp
from tests.workers.support import build_invitation
from workers.mail.message import message_id
from workers.mail.transport import (
    OutboxMailer,
    PermanentMailError,
    RecipientDeferredError,
    SmtpMailer,
    TransientMailError,
    make_mailer,
)


def invitation(n: int = 1, tenant_id: str = "t1", **overrides) -> EmailMessage:
    fields = {
        "mail_from": "Sally <no-reply@sally.example>",
        "to_address": f"user{n}@acme.example",
        "display_name": f"User {n}",
        "tenant_name": "Acme",
        "login_url": "https://sally.example",
        "message_id": message_id(tenant_id, f"u{n}"),
    }
    fields.update(overrides)
    return build_invitation(**fields)


# -- the message ------------------------------------------------------------------


def test_message_id_is_stable_per_tenant_and_user():
    """Given a tenant and a user, When the Message-ID is derived twice,
    Then it is the same RFC 5322 msg-id, and another tenant or user gets another one.
    """
    first = message_id("t1", "u1")

    assert first == message_id("t1", "u1") == "<invite.t1.u1@sally-scim.invalid>"
    assert len({first, message_id("t2", "u1"), message_id("t1", "u2")}) == 3


def test_message_id_stays_valid_for_any_id():
    """Given ids with dots, spaces and non-ASCII, When Message-IDs are derived,
    Then each parses as one msg-id and ids that would collide when joined stay distinct.
    """
    from email.headerregistry import HeaderRegistry

    odd = [message_id("a.b", "c"), message_id("a", "b.c"), message_id("t 1", "zoë@x>")]

    assert len(set(odd)) == 3
    for value in odd:
        header = HeaderRegistry()("Message-ID", value)
        assert not header.defects and str(header) == value


def test_invitation_reaches_the_server_with_its_headers(smtp, mailer):
    """Given an invitation for Zoë of Acme, When it is sent over SMTP,
    Then the server holds one message with Subject, From, To, Date, the stable
    Message-ID, and a text and an HTML part that both link to Sally.
    """
    mailer.send(invitation(display_name="Zoë Martin", to_address="zoe@acme.example"))

    assert len(smtp.messages) == 1
    received = smtp.messages[0]
    assert received["Subject"] == "Acme invited you to Sally"
    assert received["From"] == "Sally <no-reply@sally.example>"
    assert received["To"] == "Zoë Martin <zoe@acme.example>"
    assert received["Message-ID"] == message_id("t1", "u1")
    assert received["Date"].datetime.tzinfo is not None
    text = received.get_body(("plain",)).get_content()
    html = received.get_body(("html",)).get_content()
    assert "Acme has given you access to Sally" in text
    assert "https://sally.example" in text and 'href="https://sally.example"' in html


def test_a_line_break_in_a_name_cannot_add_a_header(smtp, mailer):
    """Given a display name from the IdP that carries CR/LF and a Bcc line,
    When the invitation is sent, Then the only recipient is the invited address.
    """
    mailer.send(invitation(display_name="Eve\r\nBcc: attacker@evil.example", tenant_name="Acme\nBcc: x@y.example"))

    received = smtp.messages[0]
    assert received["Bcc"] is None
    assert received["To"].addresses[0].addr_spec == "user1@acme.example"


@pytest.mark.parametrize("address", ["not-an-address", "two words@acme.example", "a@@acme.example", "zoë@acme.example"])
def test_an_unusable_address_is_refused_before_sending(address):
    """Given an address that is no usable email address, When the invitation is built, Then ValueError says so."""
    with pytest.raises(ValueError, match="not a usable email address"):
        invitation(to_address=address)


def parsed(mail) -> EmailMessage:
    return message_from_bytes(mail.data, policy=email.policy.default)


def test_the_message_is_7bit_rfc5322_with_non_ascii_names_encoded():
    """Given a tenant and a user whose names are not ASCII, When the invitation is built,
    Then the message is ASCII only with CRLF lines of at most 78 characters (no 8BITMIME or SMTPUTF8 needed,
    RFC 5322 §2.1.1), and a reader decodes the names in the headers (RFC 2047) and in both parts.
    """
    mail = invitation(display_name="Zoë Ångström", tenant_name="Société Générale")

    assert mail.data.isascii()
    lines = mail.data.split(b"\r\n")
    assert b"\n" not in b"".join(lines) and all(len(line) <= 78 for line in lines)
    received = parsed(mail)
    assert not received.defects
    assert received["Subject"] == "Société Générale invited you to Sally"
    assert received["To"] == "Zoë Ångström <user1@acme.example>"
    text = received.get_body(("plain",)).get_content()
    assert text.replace("\r\n", "\n").startswith("Hello Zoë Ångström,\n\nSociété Générale has given you access")
    assert "<p>Hello Zoë Ångström,</p>" in received.get_body(("html",)).get_content()
    assert (mail.sender, mail.recipient, mail.message_id) == ("no-reply@sally.example", "user1@acme.example",
                                                              message_id("t1", "u1"))


@pytest.mark.parametrize(
    "name",
    [
        'Martin, Zoë "Z" (Ops)',
        'Martin, Zoe "Z" \\ (Ops)',
        "=?utf-8?q?Admin?=",
        "Zoë " + "Ångström " * 40,
        "Zoe " + "Martin " * 40,
        "Eve\x00\x1b[31m\x7f\x85Bcc: x@evil.example",
    ],
)
def test_any_display_name_stays_one_name_of_one_recipient(name):
    """Given a display name with specials, quotes, an encoded-word look-alike, great length or control
    characters, When the invitation is built, Then the To field holds exactly one address, the
    invited one, under the name as given (controls as spaces), and no line exceeds 998 characters.
    """
    mail = invitation(display_name=name)

    received = parsed(mail)
    assert [a.addr_spec for a in received["To"].addresses] == ["user1@acme.example"]
    assert received["Bcc"] is None
    shown = received["To"].addresses[0].display_name
    expected = " ".join("".join(" " if ord(ch) < 32 or 127 <= ord(ch) < 160 else ch for ch in name).split())
    # A name folded over encoded words reads back with the folding space (the email package's own folding).
    assert shown.replace(" ", "") == expected.replace(" ", "")
    assert all(len(line) <= 998 for line in mail.data.split(b"\r\n"))


def test_long_lines_and_a_boundary_look_alike_stay_inside_their_part():
    """Given a long login URL and a tenant name that spells a MIME boundary, When the invitation is built,
    Then the parts are still exactly a text and an HTML alternative, and the URL survives intact.
    """
    url = "https://sally.example/" + "x" * 150
    mail = invitation(tenant_name="--=_sally_0123 Acme", login_url=url)

    received = parsed(mail)
    assert [part.get_content_type() for part in received.iter_parts()] == ["text/plain", "text/html"]
    assert url in received.get_body(("plain",)).get_content()
    assert f'href="{url}"' in received.get_body(("html",)).get_content()
    assert all(len(line) <= 78 for line in mail.data.split(b"\r\n"))


def test_an_internationalised_domain_is_sent_in_its_ascii_form():
    """Given an address whose domain is not ASCII, When the invitation is built,
    Then envelope and To carry the IDNA form (RFC 5890), so no SMTPUTF8 is needed.
    """
    mail = invitation(to_address="zoe@bücher.example")

    assert mail.recipient == "zoe@xn--bcher-kva.example"
    assert parsed(mail)["To"].addresses[0].addr_spec == "zoe@xn--bcher-kva.example"


@pytest.mark.parametrize("mail_from", ["no address", "Sally <a@b>\r\nBcc: x@evil.example", "a@x, b@y"])
def test_an_unusable_mail_from_is_refused(mail_from):
    """Given a MAIL_FROM that is not one usable address, When an invitation is built, Then ValueError names it."""
    with pytest.raises(ValueError, match="MAIL_FROM"):
        invitation(mail_from=mail_from)


def test_mail_from_with_a_non_ascii_name_is_encoded():
    """Given MAIL_FROM with a non-ASCII display name, When the invitation is built,
    Then the From field reads back as configured and the envelope sender is its address.
    """
    mail = invitation(mail_from="Équipe Sally <no-reply@sally.example>")

    assert parsed(mail)["From"] == "Équipe Sally <no-reply@sally.example>"
    assert mail.sender == "no-reply@sally.example" and mail.data.isascii()


# -- SMTP: connections ------------------------------------------------------------


def test_fifty_messages_share_one_connection(smtp, mailer):
    """Given one mailer, When 50 invitations are sent from one thread,
    Then all 50 arrive over a single SMTP session (a burst must not open one per mail).
    """
    for n in range(50):
        mailer.send(invitation(n))

    assert len(smtp.messages) == 50
    assert smtp.connections == 1


def test_each_thread_keeps_its_own_connection(smtp, mailer):
    """Given four worker threads sharing one mailer, When each sends ten messages,
    Then 40 arrive over exactly four sessions (one per thread, reused).
    """
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for n in range(10):
                mailer.send(invitation(thread * 100 + n))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(smtp.messages) == 40
    assert smtp.connections == 4


def test_a_dropped_connection_is_reopened(smtp, mailer):
    """Given the server hangs up in the middle of a message, When the message is sent,
    Then the mailer reconnects and the message arrives once.
    """
    mailer.send(invitation(1))
    smtp.drop_next(1)

    mailer.send(invitation(2))

    assert smtp.message_ids() == [message_id("t1", "u1"), message_id("t1", "u2")]
    assert smtp.connections == 2


def test_an_unreachable_server_is_transient():
    """Given nothing listens on the port, When a message is sent,
    Then every attempt is made and the error is transient.
    """
    with SmtpMailer(f"smtp://127.0.0.1:{free_port()}", timeout=2, attempts=2, wait_seconds=0.01) as mailer:
        with pytest.raises(TransientMailError, match="could not be reached"):
            mailer.send(invitation())


# -- SMTP: replies ----------------------------------------------------------------


def test_a_421_is_retried_and_the_message_arrives_once(smtp, mailer):
    """Given the server answers 421 to the next message, When it is sent,
    Then tenacity retries the exchange and the server holds the message once.
    """
    smtp.fail_next(1, "421 4.3.2 Service not available, try later")

    mailer.send(invitation())

    assert smtp.data_attempts == 2
    assert smtp.message_ids() == [message_id("t1", "u1")]


def test_transient_replies_until_the_attempts_are_spent(smtp, mailer):
    """Given the server answers 451 three times, When a message is sent with three attempts,
    Then TransientMailError carries the server's reply and nothing was delivered.
    """
    smtp.fail_next(3, "451 4.3.0 Mail server temporarily rejected message")

    with pytest.raises(TransientMailError) as caught:
        mailer.send(invitation())

    assert caught.value.code == 451
    assert "451 4.3.0 Mail server temporarily rejected message" in caught.value.reason
    assert smtp.data_attempts == 3
    assert smtp.messages == []


def test_a_refused_recipient_is_permanent_and_not_retried(smtp, mailer):
    """Given the server answers 550 to the recipient, When the message is sent,
    Then PermanentMailError says the recipient was refused, after a single attempt,
    and the same connection still carries the next message.
    """
    smtp.fail_next(1, "550 5.1.1 User unknown", at="RCPT")

    with pytest.raises(PermanentMailError) as caught:
        mailer.send(invitation(1))
    mailer.send(invitation(2))

    assert caught.value.code == 550
    assert caught.value.reason == "the mail server refused the recipient: 550 5.1.1 User unknown"
    assert smtp.rcpt_attempts == 2
    assert smtp.message_ids() == [message_id("t1", "u2")]
    assert smtp.connections == 1


def test_a_deferred_recipient_is_transient_and_keeps_the_connection(smtp, mailer):
    """Given the server defers the recipient (451 at RCPT, greylisting) on every attempt, When a message is sent,
    Then RecipientDeferredError (a TransientMailError) says so after the attempts, and the same
    SMTP session carries the next message: the deferral was about that recipient only.
    """
    smtp.fail_next(3, "451 4.7.1 Greylisted", at="RCPT")

    with pytest.raises(RecipientDeferredError) as caught:
        mailer.send(invitation(1))
    mailer.send(invitation(2))

    assert isinstance(caught.value, TransientMailError) and caught.value.code == 451
    assert smtp.message_ids() == [message_id("t1", "u2")]
    assert smtp.connections == 1


def test_a_421_at_rcpt_is_the_server_closing_not_a_deferred_recipient(smtp, mailer):
    """Given the server answers 421 at RCPT (it is shutting down, RFC 5321 §3.8) on every attempt,
    When a message is sent, Then the error is transient but not RecipientDeferredError, so a batch stops.
    """
    smtp.fail_next(3, "421 4.3.2 Shutting down", at="RCPT")

    with pytest.raises(TransientMailError) as caught:
        mailer.send(invitation(1))

    assert not isinstance(caught.value, RecipientDeferredError)


def test_a_refused_message_is_permanent(smtp, mailer):
    """Given the server answers 554 at the end of DATA, When the message is sent,
    Then PermanentMailError says the message was refused, after a single attempt.
    """
    smtp.fail_next(1, "554 5.7.1 Message rejected as spam")

    with pytest.raises(PermanentMailError, match="refused the message: 554 5.7.1 Message rejected as spam"):
        mailer.send(invitation())

    assert smtp.data_attempts == 1


def test_credentials_from_the_url_are_used_and_never_logged(caplog):
    """Given SMTP_URL with a user and a percent-encoded password, When messages are sent and retried,
    Then the server sees the decoded credentials once per connection, and neither our logs
    nor the mailer's repr contain the password.
    """
    caplog.set_level(logging.DEBUG)
    with FakeSmtp(auth=True) as server:
        url = f"smtp://mailer%40acme:s3cr%40t%3Apw@127.0.0.1:{server.port}"
        with SmtpMailer(url, timeout=5, attempts=2, wait_seconds=0.01, allow_plaintext_auth=True) as mailer:
            server.fail_next(1, "421 try again")
            mailer.send(invitation(1))
            mailer.send(invitation(2))
            text = repr(mailer)

    assert server.logins == [(b"mailer@acme", b"s3cr@t:pw")] * 2
    assert len(server.messages) == 2
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("workers")]
    assert ours, "the retry was logged"
    assert not any("s3cr" in line for line in ours)
    assert "s3cr" not in text and "mailer@acme" in text


def test_credentials_are_never_sent_without_tls_unless_allowed():
    """Given a mail server that offers AUTH without TLS and SMTP_URL with credentials over plain smtp://,
    When the mailer is built without SMTP_ALLOW_PLAINTEXT_AUTH, Then it is refused before any connection;
    When the URL asks for STARTTLS and the server offers none, Then the send fails for good and no login
    was attempted; only an explicit allow sends them in clear text.
    """
    with FakeSmtp(auth=True) as server:
        plain = f"smtp://mailer%40acme:s3cr%40t%3Apw@127.0.0.1:{server.port}"
        with pytest.raises(ValueError, match="no TLS"):
            SmtpMailer(plain)
        assert server.connections == 0

        starttls = f"smtp+starttls://mailer%40acme:s3cr%40t%3Apw@127.0.0.1:{server.port}"
        with SmtpMailer(starttls, timeout=5, attempts=1) as mailer:
            with pytest.raises(PermanentMailError, match="STARTTLS"):
                mailer.send(invitation(1))
        assert server.logins == [] and server.messages == []

        allowed = Settings(smtp_url=plain, smtp_allow_plaintext_auth=True)
        with make_mailer(allowed) as mailer:
            mailer.send(invitation(2))
    assert server.logins == [(b"mailer@acme", b"s3cr@t:pw")]
    assert len(server.messages) == 1


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("smtp://mail.example", "smtp://mail.example:25"),
        ("smtp+starttls://u:p@mail.example", "smtp+starttls://u@mail.example:587"),
        ("smtps://mail.example", "smtps://mail.example:465"),
        ("smtp://mail.example:2525", "smtp://mail.example:2525"),
    ],
)
def test_smtp_url_schemes_and_default_ports(url, shown):
    """Given an SMTP_URL, When the mailer is built, Then it targets the scheme's default port (no connection yet)."""
    assert repr(SmtpMailer(url)) == f"SmtpMailer({shown})"


@pytest.mark.parametrize("url", ["http://mail.example", "smtp://", "mail.example:25"])
def test_an_unusable_smtp_url_is_refused(url):
    """Given an SMTP_URL that is not smtp(s), When the mailer is built, Then ValueError names the problem."""
    with pytest.raises(ValueError, match="SMTP_URL"):
        SmtpMailer(url)


# -- outbox -----------------------------------------------------------------------


def test_outbox_writes_one_file_per_message_id_and_a_resend_overwrites(tmp_path: Path):
    """Given the outbox mailer, When two invitations are written and the first is sent again,
    Then the folder holds two .eml files, the first one overwritten, and no temporary file.
    """
    outbox = OutboxMailer(tmp_path / "outbox")

    outbox.send(invitation(1, display_name="First"))
    outbox.send(invitation(2))
    outbox.send(invitation(1, display_name="Again"))

    files = sorted((tmp_path / "outbox").iterdir())
    assert [file.suffix for file in files] == [".eml", ".eml"]
    first = message_from_bytes(outbox.path_for(message_id("t1", "u1")).read_bytes(), policy=email.policy.default)
    assert first["Message-ID"] == message_id("t1", "u1")
    assert first["To"] == "Again <user1@acme.example>"


def test_make_mailer_follows_smtp_url(tmp_path: Path):
    """Given Settings with and without SMTP_URL, When the mailer is made,
    Then SMTP is used when set, else the outbox of SALLY_VAR_DIR.
    """
    with_smtp = make_mailer(Settings(var_dir=tmp_path, smtp_url="smtp://mail.example:2525"))
    without = make_mailer(Settings(var_dir=tmp_path))

    assert repr(with_smtp) == "SmtpMailer(smtp://mail.example:2525)"
    assert isinstance(without, OutboxMailer) and without.directory == tmp_path / "outbox"
