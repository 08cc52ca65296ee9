"""Secrets are masked in every log record, whatever logger or handler prints it."""

from __future__ import annotations

import logging

from models.redaction import install_secret_masking
from models.settings import Settings


def test_log_records_mask_settings_secrets(caplog):
    """Given the secret mask installed from Settings, When a library logger logs a message, its arguments
    and an exception that quote the secrets, Then the captured text holds none of them.
    """
    settings = Settings(
        admin_token="admin-secret-0001",
        redis_url="redis://:redis-secret-0002@cache.example:6379/0",
        smtp_url="smtps://u:mail%2Bsecret-0003@mail.example",
    )
    install_secret_masking(settings.secrets())
    caplog.set_level(logging.INFO)
    third_party = logging.getLogger("some.library")

    third_party.info("token %s from %s", settings.admin_token, settings.redis_url)
    try:
        raise RuntimeError("login failed with mail+secret-0003")
    except RuntimeError:
        logging.getLogger("workers.something").exception("send failed")

    text = caplog.text + "".join(record.getMessage() for record in caplog.records)
    assert "token *** from redis://:***@cache.example:6379/0" in text
    assert "login failed with ***" in text
    for secret in ("admin-secret-0001", "redis-secret-0002", "mail+secret-0003", "mail%2Bsecret-0003"):
        assert secret not in text
