"""The one Settings object, built from the environment in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

TIERS: tuple[str, ...] = ("starter", "team", "enterprise")
"""License tiers, lowest first: a user in several license groups gets the first."""


class SettingsError(ValueError):
    """A setting has a value we cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _seconds(
    env: Mapping[str, str], name: str, default: float, minimum: float, maximum: float | None = None
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value >= minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {raw}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be at most {maximum}, got {raw}")
    return value


def normalise_database_url(url: str) -> str:
    """Drive plain `postgresql://` URLs with psycopg 3, as CONTRACT.md promises."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@dataclass(frozen=True)
class Settings:
    """Everything configurable; tests build it directly, the CLI from the environment."""

    var_dir: Path = Path("var")
    database_url: str = ""
    redis_url: str | None = None
    public_base_url: str = "http://127.0.0.1:8000"
    admin_token: str | None = None
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    stripe_prices: dict[str, str] = field(default_factory=dict)
    smtp_url: str | None = None
    mail_from: str = "Sally <no-reply@localhost>"
    host: str = "127.0.0.1"
    port: int = 8000
    web_processes: int = 1
    worker_processes: int = 1
    worker_threads: int = 8
    # Largest SCIM request body we read (RFC 7644 §3.7.4 maxPayloadSize).
    max_body_bytes: int = 2 * 1024 * 1024
    # Requests per second per bearer token before 429; 0 turns the limit off.
    # Well above the pace of an IdP's provisioning cycle (issue 8).
    scim_rate_limit: int = 200
    # Failed SCIM authentications per client address per minute before 429.
    scim_auth_failure_limit: int = 30
    sweep_interval: float = 10.0
    # Stripe webhooks (POST /stripe/webhook); without a secret the endpoint answers
    # 400 to everything and the sweep re-reads each linked subscription instead.
    stripe_webhook_secret: str | None = None
    # Seconds one Stripe HTTP request may take before it counts as lost (at most 20).
    stripe_timeout: float = 20.0
    # Without webhooks: re-read a linked subscription's seats this often (seconds).
    stripe_resync_interval: float = 900.0
    # Worker threads of the purchases queue, apart from the reconcile/invitation threads,
    # so a Stripe that does not answer never stalls reconcile or invitations.
    purchase_threads: int = 4
    # At least this many seconds between two seat updates of one Stripe subscription;
    # a purchase is frozen this long after it is planned, so demand meanwhile joins it.
    stripe_update_spacing: float = 2.0
    # Prefix for every Redis key and queue, so that several deployments
    # (or test runs) can share one Redis server.
    redis_namespace: str = "sally"

    def __post_init__(self) -> None:
        if not 0 < self.stripe_timeout <= 20:
            # Stripe's own guidance: a request with no answer after this is lost.
            raise SettingsError(f"stripe_timeout must be in (0, 20] seconds, got {self.stripe_timeout}")
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{Path(self.var_dir) / 'sally.db'}")
        object.__setattr__(self, "database_url", normalise_database_url(self.database_url))
        object.__setattr__(self, "public_base_url", self.public_base_url.rstrip("/"))
        object.__setattr__(self, "var_dir", Path(self.var_dir))

    @property
    def outbox_dir(self) -> Path:
        return self.var_dir / "outbox"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read CONTRACT.md's environment variables; nothing else reads os.environ."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        prices = {tier: env[f"STRIPE_PRICE_{tier.upper()}"].strip() for tier in TIERS if get(f"STRIPE_PRICE_{tier.upper()}")}
        return cls(
            var_dir=Path(get("SALLY_VAR_DIR") or "var"),
            database_url=get("DATABASE_URL") or "",
            redis_url=get("REDIS_URL"),
            public_base_url=get("PUBLIC_BASE_URL") or "http://127.0.0.1:8000",
            admin_token=get("SALLY_ADMIN_TOKEN"),
            stripe_api_key=get("STRIPE_API_KEY"),
            stripe_api_base=get("STRIPE_API_BASE"),
            stripe_prices=prices,
            smtp_url=get("SMTP_URL"),
            mail_from=get("MAIL_FROM") or "Sally <no-reply@localhost>",
            host=get("HOST") or "127.0.0.1",
            port=_int(env, "PORT", 8000, 1),
            web_processes=_int(env, "WEB_PROCESSES", 1, 1),
            worker_processes=_int(env, "WORKER_PROCESSES", 1, 1),
            worker_threads=_int(env, "WORKER_THREADS", 8, 1),
            max_body_bytes=_int(env, "SCIM_MAX_BODY_BYTES", 2 * 1024 * 1024, 1024),
            scim_rate_limit=_int(env, "SCIM_RATE_LIMIT", 200, 0),
            scim_auth_failure_limit=_int(env, "SCIM_AUTH_FAILURE_LIMIT", 30, 0),
            # Not in CONTRACT.md: tests shorten the sweep to keep crash recovery quick.
            sweep_interval=_seconds(env, "SALLY_SWEEP_INTERVAL", 10.0, 0.5),
            redis_namespace=get("SALLY_REDIS_NAMESPACE") or "sally",
            stripe_webhook_secret=get("STRIPE_WEBHOOK_SECRET"),
            stripe_timeout=_seconds(env, "STRIPE_TIMEOUT", 20.0, 0.1, maximum=20.0),
            stripe_resync_interval=_seconds(env, "STRIPE_RESYNC_INTERVAL", 900.0, 1.0),
            purchase_threads=_int(env, "PURCHASE_THREADS", 4, 1),
            stripe_update_spacing=_seconds(env, "STRIPE_UPDATE_SPACING", 2.0, 0.0),
        )
