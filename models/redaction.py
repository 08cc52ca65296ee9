"""Secrets never reach a log line: every record is masked where it is made, whichever handler prints it."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Iterable

MASK = "***"

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
_installed = False


def mask(text: str, secrets: Iterable[str] | None = None) -> str:
    """The text with every known secret (longest first) replaced by ***."""
    for secret in _secrets if secrets is None else secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def install_secret_masking(secrets: Iterable[str]) -> None:
    """Mask these values in every log record this process makes from now on (uvicorn's and Dramatiq's too).

    A record factory, not a handler filter: uvicorn and Dramatiq bring their
    own handlers, and a filter on the root's handlers would not see theirs.
    """
    global _secrets, _installed
    with _lock:
        # Short values would mask ordinary words; real secrets are long.
        wanted = {secret for secret in secrets if secret and len(secret) >= 6}
        _secrets = tuple(sorted(wanted | set(_secrets), key=len, reverse=True))
        if _installed:
            return
        _installed = True
        previous = logging.getLogRecordFactory()

        def masked_record(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if not _secrets:
                return record
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string is logging's to report, not ours
                return record
            masked = mask(message)
            if masked != message:
                record.msg, record.args = masked, ()
            if record.exc_info and record.exc_info[0] is not None:
                # Formatted here so the traceback's text (and exception messages) is masked too.
                record.exc_text = mask("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            return record

        logging.setLogRecordFactory(masked_record)
