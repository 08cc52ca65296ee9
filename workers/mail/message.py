"""The invitation email: its stable Message-ID and its RFC 5322 text, built fast from a per-tenant template.

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
import html
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.headerregistry import Address

from models.tables import utcnow

MESSAGE_ID_DOMAIN = "sally-scim.invalid"
# Characters of a user's name in the greeting.
MAX_NAME = 64
# Longest one-line text (a reason, a cleaned name) we keep.
MAX_LINE = 500


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


class UnusableAddressError(ValueError):
    """The recipient's address cannot be used in a message (no usable email address)."""


@dataclass(frozen=True)
class Mail:
    """One message ready for the wire: the envelope, its Message-ID, and the RFC 5322 text (CRLF, ASCII only)."""

    sender: str
    recipient: str
    message_id: str
    data: bytes


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
        # A name from the IdP can be as long as it likes; the greeting uses its first 64 characters.
        short = name[:MAX_NAME].rstrip()
        greeting = f"Hello {short}," if short else "Hello,"
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
    return one_line(value.translate(_CONTROLS))


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


def one_line(text: str) -> str:
    """Whitespace (CR and LF included) folded to single spaces, at most MAX_LINE characters."""
    return " ".join(text.split())[:MAX_LINE]
