"""Settings of issue 8's fault handling: Redis and Stripe timeouts, the poison-tenant quarantine."""

from __future__ import annotations

import pytest

from models.settings import Settings, SettingsError


def test_fault_settings_have_sane_defaults():
    """Given nothing set, Then Redis gives up after 1 s (connect) / 2 s (read), Stripe after 20 s,
    and a tenant is quarantined after 5 failures in a row for 60 s, doubling up to an hour."""
    settings = Settings.from_env({})
    assert (settings.redis_connect_timeout, settings.redis_socket_timeout) == (1.0, 1.0)
    assert settings.stripe_timeout == 20.0
    assert (settings.quarantine_after, settings.quarantine_backoff, settings.quarantine_max_backoff) == (5, 60.0, 3600.0)


def test_fault_settings_are_read_from_the_environment():
    settings = Settings.from_env({
        "REDIS_CONNECT_TIMEOUT": "0.5", "REDIS_SOCKET_TIMEOUT": "1.5", "STRIPE_TIMEOUT": "7",
        "SALLY_QUARANTINE_AFTER": "3", "SALLY_QUARANTINE_BACKOFF": "30", "SALLY_QUARANTINE_MAX_BACKOFF": "600",
    })
    assert (settings.redis_connect_timeout, settings.redis_socket_timeout, settings.stripe_timeout) == (0.5, 1.5, 7.0)
    assert (settings.quarantine_after, settings.quarantine_backoff, settings.quarantine_max_backoff) == (3, 30.0, 600.0)


@pytest.mark.parametrize("name, value", [
    ("REDIS_SOCKET_TIMEOUT", "0"), ("REDIS_CONNECT_TIMEOUT", "soon"), ("STRIPE_TIMEOUT", "0.1"),
    ("SALLY_QUARANTINE_AFTER", "0"), ("SALLY_QUARANTINE_BACKOFF", "-1"),
])
def test_a_timeout_or_threshold_that_would_disable_the_guard_is_refused(name, value):
    """A zero timeout would mean "wait forever" to redis-py; zero failures would quarantine at once."""
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})
