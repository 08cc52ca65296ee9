"""Invitation mail: the message, a stable Message-ID, and two ways to send it (SMTP or an outbox folder).

``SmtpMailer`` is the one place that talks SMTP. smtplib's exceptions never
leave it: they become ``TransientMailError`` (the job may be retried later) or
``PermanentMailError`` (the mail server refused for good: record it, stop).

A burst invites thousands of people of one tenant, so the message is not built
with ``email.message.EmailMessage`` (about 1.4 ms of CPU per mail, most of it
header parsing and folding) but rendered from an ``InvitationTemplate``: what
is the same for every user of a tenant (From, Subject) is parsed, validated
and folded once by the email package; per user only the To field, the Date,
the Message-ID and the two small bodies are assembled, as ASCII-only RFC 5322
text (RFC 2047 encoded words, quoted-printable bodies), in tens of microseconds.
"""

from __future__ import annotations

import binascii
import email.errors
import email.policy
import email.utils
import functools
import hashlib
import html
import logging
import os
import re
import secrets
import smtplib
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.headerregistry import Address
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import tenacity

from models.retries import retry_policy
from models.tables import utcnow

if TYPE_CHECKING:
    from models.settings import Settings

log = logging.getLogger(__name__)

MESSAGE_ID_DOMAIN = "sally-scim.invalid"
# Per-operation socket timeout of the mailer make_mailer builds: three
# attempts that each stall once stay well inside the invitation claim lease
# (60 s), so a slow send is not mistaken for a dead worker and resent.
SMTP_TIMEOUT_SECONDS = 10.0
# A connection idle longer than this is checked with NOOP before reuse:
# servers drop idle clients (Postfix after 300 s) and a stale socket would
# otherwise cost a failed attempt.
IDLE_CHECK_SECONDS = 30.0
DEFAULT_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}
MAX_REASON = 500


def message_id(tenant_id: str, user_id: str) -> str:
    """The invitation's RFC 5322 Message-ID: the same for every (re)send to one user of one tenant."""
    return f"<invite.{_atom(tenant_id)}.{_atom(user_id)}@{MESSAGE_ID_DOMAIN}>"


def _atom(value: str) -> str:
    # Our ids are hex and pass unchanged; anything else is escaped (RFC 5322
    # §3.6.4 dot-atom-text), injectively, so two users never share an id.
    return "".join(
        ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "".join(f"={b:02X}" for b in ch.encode())
        for ch in value
    )


class MailError(Exception):
    """Sending failed; ``reason`` is one line, safe to store and show (never holds a password)."""

    def __init__(self, reason: str, *, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class PermanentMailError(MailError):
    """The mail server refused the message for good (5xx), or the message cannot be sent as it is."""


class TransientMailError(MailError):
    """The mail server could not be reached or asked us to come back later (4xx, dropped connection)."""


class RecipientDeferredError(TransientMailError):
    """The mail server deferred this one recipient (4xx to RCPT TO, not 421): the next message may go through."""


class UnusableAddressError(ValueError):
    """The recipient's address cannot be used in a message (no usable email address)."""


@dataclass(frozen=True)
class Mail:
    """One message ready for the wire: the envelope, its Message-ID, and the RFC 5322 text (CRLF, ASCII only)."""

    sender: str
    recipient: str
    message_id: str
    data: bytes

    def as_bytes(self) -> bytes:
        return self.data


class SmtpMailer:
    """Sends over SMTP, one reused connection per thread, retrying transient faults of one exchange.

    ``url`` is ``smtp://[user:password@]host[:port]`` (``smtp+starttls://`` to
    upgrade with STARTTLS, ``smtps://`` for implicit TLS). One recipient per
    message: a refusal is reported for the message as a whole.
    """

    def __init__(self, url: str, timeout: float = 20, attempts: int = 3, wait_seconds: float = 0.5) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"SMTP_URL must start with smtp://, smtp+starttls:// or smtps://, got {scheme!r}")
        if not parts.hostname:
            raise ValueError("SMTP_URL has no host")
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self._scheme = scheme
        self._host = parts.hostname
        self._port = parts.port or DEFAULT_PORTS[scheme]
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else ""
        self._timeout = timeout
        self._attempts = attempts
        self._wait_seconds = wait_seconds
        self._local = threading.local()
        # Every open connection, whichever thread opened it, so close() can close them all.
        self._open: set[smtplib.SMTP] = set()
        self._lock = threading.Lock()
        self._local_hostname: str | None = None

    def __repr__(self) -> str:
        user = f"{self._username}@" if self._username else ""
        return f"SmtpMailer({self._scheme}://{user}{self._host}:{self._port})"

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def send(self, mail: Mail) -> None:
        """Deliver one message; raises PermanentMailError, or TransientMailError once the attempts are spent."""
        retrying = retry_policy(
            attempts=self._attempts,
            wait_seconds=self._wait_seconds,
            max_wait_seconds=self._wait_seconds * 8,
            retry=tenacity.retry_if_exception_type(TransientMailError),
            before_sleep=self._log_retry,
        )
        retrying(self._send_once, mail)

    def close(self) -> None:
        """Say QUIT on every connection this mailer opened, in any thread."""
        with self._lock:
            connections = list(self._open)
            self._open.clear()
        for smtp in connections:
            _quit(smtp)

    def __enter__(self) -> SmtpMailer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one exchange ------------------------------------------------------------

    def _send_once(self, mail: Mail) -> None:
        try:
            smtp = self._connection()
            refused = smtp.sendmail(mail.sender, [mail.recipient], mail.data)
        except smtplib.SMTPServerDisconnected as error:
            self._discard()
            raise _translate(error) from None
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as error:
            # smtplib has already sent RSET: the connection is fit for the next
            # message, unless the refusal was the server hanging up (421).
            translated = _translate(error)
            if isinstance(translated, TransientMailError) and not isinstance(translated, RecipientDeferredError):
                self._discard()
            raise translated from None
        except (smtplib.SMTPException, OSError, ValueError) as error:
            self._discard()
            raise _translate(error) from None
        if refused:
            # Only with several recipients: the others got it, so say which failed.
            codes = ", ".join(str(code) for code, _ in refused.values())
            raise PermanentMailError(f"the mail server refused {len(refused)} recipient(s) ({codes})")

    def _connection(self) -> smtplib.SMTP:
        smtp: smtplib.SMTP | None = getattr(self._local, "smtp", None)
        if smtp is not None and getattr(smtp, "sock", None) is None:
            # smtplib closed it after the server hung up.
            self._discard()
            smtp = None
        if smtp is not None and time.monotonic() - self._local.used_at > IDLE_CHECK_SECONDS:
            try:
                alive = smtp.noop()[0] == 250
            except (smtplib.SMTPException, OSError):
                alive = False
            if not alive:
                self._discard()
                smtp = None
        if smtp is None:
            smtp = self._connect()
            self._local.smtp = smtp
            with self._lock:
                self._open.add(smtp)
        self._local.used_at = time.monotonic()
        return smtp

    def _connect(self) -> smtplib.SMTP:
        local_hostname = self._fqdn()
        if self._scheme == "smtps":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                self._host, self._port, local_hostname=local_hostname, timeout=self._timeout,
                context=ssl.create_default_context(),
            )
        else:
            smtp = smtplib.SMTP(self._host, self._port, local_hostname=local_hostname, timeout=self._timeout)
        try:
            smtp.ehlo_or_helo_if_needed()
            if self._scheme == "smtp+starttls":
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if self._username:
                smtp.login(self._username, self._password)
        except BaseException:
            smtp.close()
            raise
        log.debug("opened SMTP connection to %s", self.address)
        return smtp

    def _fqdn(self) -> str:
        # smtplib would look this up on every connection (a DNS query); once is enough.
        if self._local_hostname is None:
            self._local_hostname = socket.getfqdn()
        return self._local_hostname

    def _discard(self) -> None:
        smtp: smtplib.SMTP | None = getattr(self._local, "smtp", None)
        self._local.smtp = None
        if smtp is None:
            return
        with self._lock:
            self._open.discard(smtp)
        smtp.close()

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        code = getattr(error, "code", None)
        # A server's reply text may quote the recipient's address: log its code only.
        detail = f"reply {code}" if code else getattr(error, "reason", type(error).__name__)
        log.info(
            "SMTP exchange with %s failed (attempt %d of %d: %s), retrying",
            self.address,
            retry_state.attempt_number,
            self._attempts,
            detail,
        )


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()


def _translate(error: BaseException) -> MailError:
    """Sort one smtplib/socket failure into transient (4xx, network) or permanent (5xx, unusable message)."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        replies = list(error.recipients.values())
        code, text = replies[0] if replies else (0, b"")
        if replies and all(500 <= reply_code < 600 for reply_code, _ in replies):
            return PermanentMailError(f"the mail server refused the recipient: {_reply(code, text)}", code=code)
        if replies and all(400 <= reply_code < 500 and reply_code != 421 for reply_code, _ in replies):
            # Greylisting, a full mailbox (RFC 5321 §4.2.5: 450, 451, 452): about this recipient only.
            return RecipientDeferredError(f"the mail server deferred the recipient: {_reply(code, text)}", code=code)
        return TransientMailError(f"the mail server deferred the recipient: {_reply(code, text)}", code=code)
    if isinstance(error, smtplib.SMTPResponseException):
        code, text = error.smtp_code, error.smtp_error
        what = {
            smtplib.SMTPSenderRefused: "refused the sender (MAIL_FROM)",
            smtplib.SMTPDataError: "refused the message",
            smtplib.SMTPAuthenticationError: "refused the SMTP credentials",
            smtplib.SMTPConnectError: "refused the connection",
            smtplib.SMTPHeloError: "refused our greeting",
        }.get(type(error), "refused the command")
        if 500 <= code < 600:
            return PermanentMailError(f"the mail server {what}: {_reply(code, text)}", code=code)
        return TransientMailError(f"the mail server {what} for now: {_reply(code, text)}", code=code)
    if isinstance(error, smtplib.SMTPServerDisconnected):
        return TransientMailError("the mail server closed the connection")
    if isinstance(error, smtplib.SMTPException):
        # Missing STARTTLS/AUTH/SMTPUTF8 support: no retry changes the server's capabilities.
        return PermanentMailError(f"the mail server cannot take this message: {_one_line(str(error))}")
    if isinstance(error, ssl.SSLCertVerificationError):
        return PermanentMailError(f"the mail server's TLS certificate is not trusted: {error.verify_message}")
    if isinstance(error, (ValueError, UnicodeError)):
        return PermanentMailError(f"the message cannot be sent: {_one_line(str(error))}")
    if isinstance(error, TimeoutError):
        return TransientMailError("the mail server did not answer in time")
    return TransientMailError(f"the mail server could not be reached ({type(error).__name__}: {_one_line(str(error))})")


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return f"{code} {_one_line(text)}".strip()


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_REASON]


class OutboxMailer:
    """Writes each message to ``directory`` as ``<hash of Message-ID>.eml``: a resend overwrites, never duplicates."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._made = False

    def __repr__(self) -> str:
        return f"OutboxMailer({str(self.directory)!r})"

    def path_for(self, msg_id: str) -> Path:
        return self.directory / f"{hashlib.sha256(msg_id.encode()).hexdigest()[:32]}.eml"

    def send(self, mail: Mail) -> None:
        """Write the message atomically (temporary file, then rename)."""
        if not mail.message_id:
            raise PermanentMailError("the message has no Message-ID")
        target = self.path_for(mail.message_id)
        if not self._made:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._made = True
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        try:
            # No fsync: the outbox is the development stand-in for a mail server
            # (no SMTP_URL), and an fsync per message cost a sixth of each
            # invitation's CPU in a burst. The write and rename stay atomic, so a
            # reader never sees half a message; a machine crash may lose the last
            # files, which a real mail server's acceptance would have covered.
            with os.fdopen(fd, "wb") as file:
                file.write(mail.data)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def make_mailer(settings: Settings) -> SmtpMailer | OutboxMailer:
    """SMTP when SMTP_URL is set, else the outbox folder of SALLY_VAR_DIR."""
    if settings.smtp_url:
        return SmtpMailer(settings.smtp_url, timeout=SMTP_TIMEOUT_SECONDS)
    return OutboxMailer(settings.outbox_dir)


def build_invitation(
    *,
    mail_from: str,
    to_address: str,
    display_name: str | None,
    tenant_name: str,
    login_url: str,
    message_id: str,
    date: datetime | None = None,
) -> Mail:
    """The invitation to Sally: plain text with an HTML alternative. Raises ValueError for an unusable address."""
    template = invitation_template(mail_from=mail_from, tenant_name=tenant_name, login_url=login_url)
    return template.render(to_address=to_address, display_name=display_name, message_id=message_id, date=date)


@functools.lru_cache(maxsize=256)
def invitation_template(*, mail_from: str, tenant_name: str, login_url: str) -> InvitationTemplate:
    """The template of one tenant's invitations, built once (a burst renders thousands from it)."""
    return InvitationTemplate(mail_from=mail_from, tenant_name=tenant_name, login_url=login_url)


class InvitationTemplate:
    """What every invitation of one tenant shares, parsed and folded once; ``render`` adds the user's parts.

    Everything user-supplied (names from the IdP, the tenant's name from the
    admin) goes through ``_clean`` — control characters, CR and LF become
    spaces — so no value can start a header or a MIME part of its own.
    Headers are ASCII: non-ASCII names become RFC 2047 encoded words, bodies
    with non-ASCII text or long lines are quoted-printable, so the message
    needs neither 8BITMIME nor SMTPUTF8 from the server.
    """

    def __init__(self, *, mail_from: str, tenant_name: str, login_url: str) -> None:
        self.sender, from_line = _sender(mail_from)
        self.tenant = _clean(tenant_name) or "Your organisation"
        self.login_url = login_url
        self._head = _fold("Subject", f"{self.tenant} invited you to Sally") + from_line
        self._tenant_html = html.escape(self.tenant)
        self._url_html = html.escape(login_url, quote=True)

    def render(self, *, to_address: str, display_name: str | None, message_id: str, date: datetime | None = None) -> Mail:
        """One user's invitation; raises UnusableAddressError (a ValueError) for an address that cannot be used."""
        name = _clean(display_name or "")
        address = _recipient(to_address)
        if not _MSG_ID.fullmatch(message_id):
            raise ValueError("not a usable Message-ID")
        greeting = f"Hello {name}," if name else "Hello,"
        text = (
            f"{greeting}\n\n"
            f"{self.tenant} has given you access to Sally.\n\n"
            f"Sign in at {self.login_url} with this email address ({address}).\n\n"
            "Welcome aboard,\nSally\n"
        )
        markup = (
            "<!DOCTYPE html>\n<html><body>\n"
            f"<p>{html.escape(greeting)}</p>\n"
            f"<p>{self._tenant_html} has given you access to Sally.</p>\n"
            f'<p><a href="{self._url_html}">Sign in to Sally</a> '
            f"with this email address ({html.escape(address)}).</p>\n"
            "<p>Welcome aboard,<br>Sally</p>\n"
            "</body></html>\n"
        )
        plain, rich = _part("plain", text), _part("html", markup)
        boundary = _boundary(plain, rich)
        data = b"".join((
            self._head,
            _to_field(name, address),
            b"Date: ", email.utils.format_datetime(date or utcnow()).encode("ascii"), b"\r\n",
            b"Message-ID: ", message_id.encode("ascii"), b"\r\n",
            # RFC 3834: an automatic message; vacation responders should not answer it.
            b"Auto-Submitted: auto-generated\r\n",
            b"MIME-Version: 1.0\r\n",
            b'Content-Type: multipart/alternative;\r\n boundary="', boundary, b'"\r\n',
            b"\r\n",
            # RFC 2046 §5.1.1: the CRLF before each delimiter belongs to the delimiter.
            b"--", boundary, b"\r\n", plain, b"\r\n",
            b"--", boundary, b"\r\n", rich, b"\r\n",
            b"--", boundary, b"--\r\n",
        ))
        return Mail(sender=self.sender, recipient=address, message_id=message_id, data=data)


# RFC 5322 §3.6.4 msg-id, as message_id() makes it: printable ASCII, no space.
_MSG_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+>")
# A phrase of atext and spaces may stand unquoted (RFC 5322 §3.2.3).
_NEEDS_QUOTES = re.compile(r'[][\\()<>@,:;".]')
# C0 and C1 controls and DEL become spaces before whitespace is folded.
_CONTROLS = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)], " ")
# Header lines longer than this take the email package's folding path (RFC 5322 §2.1.1).
_LINE = 78
_POLICY = email.policy.SMTP


def _clean(value: str) -> str:
    # Names come from the IdP and the admin: a CR/LF (or any other control
    # character) in them becomes a space and never starts a header of its own.
    return _one_line(value.translate(_CONTROLS))


def _fold(name: str, value: object) -> bytes:
    """One header, parsed and folded by the email package (the slow, general path); ValueError on CR/LF."""
    name, header = _POLICY.header_store_parse(name, value)
    return _POLICY.fold_binary(name, header)


@functools.lru_cache(maxsize=32)
def _sender(mail_from: str) -> tuple[str, bytes]:
    """MAIL_FROM's envelope address and its folded From line."""
    try:
        addresses = _POLICY.header_store_parse("From", mail_from)[1].addresses
        if len(addresses) != 1 or not addresses[0].username or not addresses[0].domain:
            raise ValueError
        only = addresses[0]
        sender = Address(display_name=only.display_name, username=only.username, domain=_ascii_domain(only.domain))
        return sender.addr_spec, _fold("From", sender)
    except (ValueError, email.errors.HeaderParseError):
        raise ValueError("MAIL_FROM is not a usable sender address") from None


def _recipient(to_address: str) -> str:
    """The address as an ASCII addr-spec (an internationalised domain in its IDNA form)."""
    address = to_address.strip()
    if not address or any(ch.isspace() for ch in address) or "@" not in address:
        raise UnusableAddressError("not a usable email address")
    try:
        # Refuses non-ASCII local parts, which would need SMTPUTF8 end to end.
        parsed = Address(addr_spec=address)
        domain = _ascii_domain(parsed.domain)
    except (ValueError, email.errors.HeaderParseError):
        raise UnusableAddressError("not a usable email address") from None
    if not parsed.username or not domain:
        raise UnusableAddressError("not a usable email address")
    return parsed.addr_spec if domain == parsed.domain else Address(username=parsed.username, domain=domain).addr_spec


def _ascii_domain(domain: str) -> str:
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("not an internationalised domain name") from None


def _to_field(name: str, address: str) -> bytes:
    """The To line: "name <address>", the name quoted (RFC 5322 §3.2.4) or encoded (RFC 2047)."""
    if not name:
        value = address
    elif not name.isascii() or "=?" in name:
        # Encoded, also an ASCII name that would otherwise read as an encoded word.
        value = f"{Header(name, 'utf-8', header_name='To').encode()} <{address}>"
    elif _NEEDS_QUOTES.search(name):
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        value = f'"{quoted}" <{address}>'
    else:
        value = f"{name} <{address}>"
    if len("To: ") + len(value) > _LINE or "\n" in value:
        # A long name or address: the email package folds it (rare, so its cost does not matter).
        return _fold("To", Address(display_name=name, addr_spec=address))
    return b"To: " + value.encode("ascii") + b"\r\n"


def _part(subtype: str, text: str) -> bytes:
    """A text/* body part in UTF-8: 7bit when it is short-lined ASCII, else quoted-printable (RFC 2045 §6.7)."""
    raw = text.replace("\n", "\r\n").encode("utf-8")
    if raw.isascii() and all(len(line) <= _LINE for line in raw.split(b"\r\n")):
        encoding, body = b"7bit", raw
    else:
        encoding, body = b"quoted-printable", binascii.b2a_qp(raw, istext=True)
    return b"".join((
        b"Content-Type: text/", subtype.encode("ascii"), b'; charset="utf-8"\r\n',
        b"Content-Transfer-Encoding: ", encoding, b"\r\n\r\n",
        body,
    ))


def _boundary(*parts: bytes) -> bytes:
    # "=_" cannot occur in quoted-printable text; 7bit text could hold it only by guessing 96 random bits.
    while True:
        boundary = b"=_sally_" + secrets.token_hex(12).encode("ascii")
        if not any(boundary in part for part in parts):
            return boundary
