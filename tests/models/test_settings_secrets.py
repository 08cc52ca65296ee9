"""Settings: secrets never shown by repr, SMTP credentials never sent without TLS unless allowed."""

from __future__ import annotations

import pytest

from models.settings import Settings, SettingsError, mask_url


def test_repr_masks_every_secret():
    """Given settings holding every kind of secret, When they are repr'd (as a log line or a traceback would),
    Then no secret appears, user names and hosts still do, and unset secrets show as None.
    """
    settings = Settings(
        database_url="postgresql://sally:db-pass-123@db.example:5432/sally",
        redis_url="redis://:redis-pass-456@cache.example:6379/0",
        smtp_url="smtps://mailer:smtp%40pass-789@mail.example",
        admin_token="admin-token-abcdef",
        stripe_api_key="sk_test_masked-stripe-key",
    )

    text = repr(settings)

    for secret in ("db-pass-123", "redis-pass-456", "smtp%40pass-789", "smtp@pass-789", "admin-token-abcdef",
                   "sk_test_masked-stripe-key"):
        assert secret not in text
    assert "postgresql+psycopg://sally:***@db.example:5432/sally" in text
    assert "redis://:***@cache.example:6379/0" in text
    assert "smtps://mailer:***@mail.example" in text
    assert "admin_token='***'" in text and "stripe_api_key='***'" in text
    assert "admin_token=None" in repr(Settings())
    assert str(settings) == text


def test_secrets_lists_each_secret_as_written_and_decoded():
    """Given a percent-encoded SMTP password, Then both forms are secrets (the log mask needs the decoded one)."""
    settings = Settings(smtp_url="smtps://u:s3cr%40t@mail.example", admin_token="tok-123456")

    assert set(settings.secrets()) == {"s3cr%40t", "s3cr@t", "tok-123456"}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("sqlite:///var/sally.db", "sqlite:///var/sally.db"),
        ("smtp://user@mail.example", "smtp://user@mail.example"),
        ("redis://u:p@h:1/2?x=1", "redis://u:***@h:1/2?x=1"),
        ("postgresql://u:p@[::1", "***"),
    ],
)
def test_mask_url(url, shown):
    """Given URLs with and without a password (and one that cannot be parsed), Then only a password is masked."""
    assert mask_url(url) == shown


def test_smtp_credentials_without_tls_are_refused_unless_allowed():
    """Given SMTP_URL with credentials over plain smtp://, When settings are read,
    Then they are refused with a clear error, unless SMTP_ALLOW_PLAINTEXT_AUTH is true;
    TLS schemes and credential-less URLs need no permission.
    """
    env = {"SMTP_URL": "smtp://user:pw@mail.example"}
    with pytest.raises(SettingsError, match="SMTP_ALLOW_PLAINTEXT_AUTH"):
        Settings.from_env(env)
    with pytest.raises(SettingsError, match="no TLS"):
        Settings(smtp_url="smtp://user:pw@mail.example")

    assert Settings.from_env({**env, "SMTP_ALLOW_PLAINTEXT_AUTH": "true"}).smtp_allow_plaintext_auth is True
    assert Settings.from_env({"SMTP_URL": "smtp+starttls://user:pw@mail.example"}).smtp_url
    assert Settings.from_env({"SMTP_URL": "smtps://user:pw@mail.example"}).smtp_url
    assert Settings.from_env({"SMTP_URL": "smtp://mail.example"}).smtp_allow_plaintext_auth is False
    with pytest.raises(SettingsError, match="true or false"):
        Settings.from_env({**env, "SMTP_ALLOW_PLAINTEXT_AUTH": "maybe"})
