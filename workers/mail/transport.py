"""Sending mail: SMTP (one reused connection per thread, retries of one exchange) or an outbox folder.

``SmtpMailer`` is the one place that talks SMTP. smtplib's exceptions never
leave it: they become ``TransientMailError`` (the job may be retried later) or
``PermanentMailError`` (the mail server refused for good: record it, stop).
"""

from __future__ import annotations

import hashlib
import logging
import os
import smtplib
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import tenacity

from models.retries import retry_policy
from workers.mail.message import Mail, one_line

if TYPE_CHECKING:
    from models.settings import Settings

log = logging.getLogger(__name__)

# Per-operation socket timeout of the mailer make_mailer builds: three
# attempts that each stall once stay well inside the invitation claim lease
# (60 s), so a slow send is not mistaken for a dead worker and resent.
SMTP_TIMEOUT_SECONDS = 10.0
# A connection idle longer than this is checked with NOOP before reuse:
# servers drop idle clients (Postfix after 300 s) and a stale socket would
# otherwise cost a failed attempt.
IDLE_CHECK_SECONDS = 30.0
DEFAULT_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


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


class SmtpMailer:
    """Sends over SMTP, one reused connection per thread, retrying transient faults of one exchange.

    ``url`` is ``smtp://[user:password@]host[:port]`` (``smtp+starttls://`` to
    upgrade with STARTTLS, ``smtps://`` for implicit TLS). One recipient per
    message: a refusal is reported for the message as a whole.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 20,
        attempts: int = 3,
        wait_seconds: float = 0.5,
        *,
        allow_plaintext_auth: bool = False,
    ) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"SMTP_URL must start with smtp://, smtp+starttls:// or smtps://, got {scheme!r}")
        if not parts.hostname:
            raise ValueError("SMTP_URL has no host")
        if scheme == "smtp" and (parts.username or parts.password) and not allow_plaintext_auth:
            # AUTH PLAIN/LOGIN over a clear connection hands the password to
            # anyone on the path (RFC 4954 §4 asks for TLS first).
            raise ValueError(
                "SMTP_URL carries credentials but no TLS: use smtp+starttls:// or smtps://, "
                "or set SMTP_ALLOW_PLAINTEXT_AUTH=true"
            )
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
        return PermanentMailError(f"the mail server cannot take this message: {one_line(str(error))}")
    if isinstance(error, ssl.SSLCertVerificationError):
        return PermanentMailError(f"the mail server's TLS certificate is not trusted: {error.verify_message}")
    if isinstance(error, (ValueError, UnicodeError)):
        return PermanentMailError(f"the message cannot be sent: {one_line(str(error))}")
    if isinstance(error, TimeoutError):
        return TransientMailError("the mail server did not answer in time")
    return TransientMailError(f"the mail server could not be reached ({type(error).__name__}: {one_line(str(error))})")


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return f"{code} {one_line(text)}".strip()


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
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        return SmtpMailer(
            settings.smtp_url, timeout=SMTP_TIMEOUT_SECONDS, allow_plaintext_auth=settings.smtp_allow_plaintext_auth
        )
    return OutboxMailer(settings.outbox_dir)
