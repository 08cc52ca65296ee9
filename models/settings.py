"""The one Settings object, built from the environment in one place."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

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


def _percent(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default, 0)
    if value > 100:
        raise SettingsError(f"{name} is a percentage (0 to 100), got {value}")
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
    if not math.isfinite(value) or not value >= minimum:
        raise SettingsError(f"{name} must be a finite number of at least {minimum}, got {raw}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be at most {maximum}, got {raw}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


MASK = "***"


def mask_url(url: str | None) -> str | None:
    """The URL with its password (if any) replaced by ***, safe to log or show."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        # Not a URL we can take apart: show none of it rather than risk a secret.
        return MASK
    if password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{hostport}"))


def url_has_credentials(url: str | None) -> bool:
    """Whether a URL carries a user name or password."""
    if not url:
        return False
    try:
        parts = urlsplit(url)
        return bool(parts.username or parts.password)
    except ValueError:
        return False


def normalise_database_url(url: str) -> str:
    """Drive plain `postgresql://` URLs with psycopg 3, as CONTRACT.md promises."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@dataclass(frozen=True)
class ScimLimits:
    """Bounded work per SCIM request: each cap is a setting, advertised in /ServiceProviderConfig."""

    # PatchOp "Operations" per PATCH request (SCIM_MAX_PATCH_OPERATIONS).
    max_patch_operations: int = 1000
    # Values of one multi-valued attribute other than a group's members: emails, roles... (SCIM_MAX_VALUES).
    max_values: int = 1000
    # Member references in one group POST, PUT or PATCH (SCIM_MAX_MEMBERS).
    max_members: int = 10_000
    # Names in `attributes` plus `excludedAttributes` (SCIM_MAX_ATTRIBUTE_NAMES).
    max_attribute_names: int = 100
    # Characters of a filter, and its comparisons (`x eq y`, `x pr`) (SCIM_MAX_FILTER_LENGTH / _TERMS).
    max_filter_length: int = 10_000
    max_filter_terms: int = 200
    # Resources a filter on attributes without a column may read to check (SCIM_MAX_FILTER_CANDIDATES).
    max_filter_candidates: int = 10_000
    # Serialised JSON size of the document we store for one resource, members not counted (SCIM_MAX_DOCUMENT_BYTES).
    max_document_bytes: int = 64 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ScimLimits":
        """The SCIM_MAX_* variables; each at least 1 (a cap of 0 would refuse every request)."""
        default = cls()
        return cls(
            max_patch_operations=_int(env, "SCIM_MAX_PATCH_OPERATIONS", default.max_patch_operations, 1),
            max_values=_int(env, "SCIM_MAX_VALUES", default.max_values, 1),
            max_members=_int(env, "SCIM_MAX_MEMBERS", default.max_members, 1),
            max_attribute_names=_int(env, "SCIM_MAX_ATTRIBUTE_NAMES", default.max_attribute_names, 1),
            max_filter_length=_int(env, "SCIM_MAX_FILTER_LENGTH", default.max_filter_length, 1),
            max_filter_terms=_int(env, "SCIM_MAX_FILTER_TERMS", default.max_filter_terms, 1),
            max_filter_candidates=_int(env, "SCIM_MAX_FILTER_CANDIDATES", default.max_filter_candidates, 1),
            max_document_bytes=_int(env, "SCIM_MAX_DOCUMENT_BYTES", default.max_document_bytes, 1024),
        )


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
    # AUTH over a connection without TLS sends the password in clear text:
    # refused unless the operator says so (e.g. a relay on localhost).
    smtp_allow_plaintext_auth: bool = False
    mail_from: str = "Sally <no-reply@localhost>"
    host: str = "127.0.0.1"
    port: int = 8000
    web_processes: int = 1
    # glibc malloc in each web process (api/allocator.py): at most this many arenas (0: glibc's
    # 8 per core), and blocks from this size (bytes) mmapped and given back when freed (0: glibc's
    # threshold, which rises after the first big free and leaves later big blocks in the heap).
    web_malloc_arenas: int = 2
    web_malloc_mmap_threshold: int = 128 * 1024
    worker_processes: int = 1
    worker_threads: int = 8
    # Largest SCIM request body we read (RFC 7644 §3.7.4 maxPayloadSize).
    max_body_bytes: int = 2 * 1024 * 1024
    # Requests per second per bearer token before 429; 0 turns the limit off.
    # Well above the pace of an IdP's provisioning cycle (issue 8).
    scim_rate_limit: int = 200
    # Failed SCIM authentications per client address per minute before 429.
    scim_auth_failure_limit: int = 30
    # Failed sign-ins to the admin page per client address per minute; past it the address waits out the minute.
    web_signin_failure_limit: int = 10
    scim_limits: ScimLimits = field(default_factory=ScimLimits)
    # PostgreSQL only: at most this many concurrent user creates of one tenant
    # share one statement and one commit (1 sends each create alone).
    scim_create_batch_max: int = 64
    # PostgreSQL only: the longest one statement may run, and the longest a
    # connection attempt may wait, in seconds (0 turns the statement limit off).
    database_statement_timeout: float = 30.0
    database_connect_timeout: float = 10.0
    sweep_interval: float = 10.0
    # Seconds a purchase's lease on its Stripe call lasts: the worker calling Stripe
    # renews it every third of this; a worker that died lets it lapse, and the sweep's
    # next message for the purchase runs it on another worker.
    purchase_lease: float = 30.0
    # Stripe webhooks (POST /stripe/webhook); without a secret the endpoint answers
    # 400 to everything and the sweep re-reads each linked subscription instead.
    stripe_webhook_secret: str | None = None
    # Seconds one Stripe HTTP request may take before it counts as lost (at least 1, at
    # most 20; the library's default of 80 s would hold a worker thread that long per attempt).
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
    # Every Redis client (broker, wake-ups, locks, telemetry, rate limit): how long to
    # wait for a connection and for an answer. A stalled Redis must cost a request at
    # most this, never a hang (the database is the truth; the sweep re-sends).
    redis_connect_timeout: float = 1.0
    redis_socket_timeout: float = 1.0
    # A tenant whose reconcile fails this many times in a row is quarantined: the
    # sweep leaves it alone for a backoff that doubles from quarantine_backoff up to
    # quarantine_max_backoff (seconds); a success clears it.
    quarantine_after: int = 5
    quarantine_backoff: float = 60.0
    quarantine_max_backoff: float = 3600.0
    # Invitations per tenant per UTC day; the rest wait for the next day
    # (a tenant may override it in its SCIM config).
    invite_daily_cap: int = 50_000
    # Mass-deprovision breaker: a reconcile that would take access from more
    # than max(hold_min_users, hold_percent % of the active users) within
    # hold_window seconds is held for the admin (tenants may override both).
    hold_min_users: int = 10
    hold_percent: int = 20
    hold_window: float = 3600.0
    # The admin web page: how long a sign-in lasts, when the SCIM page warns that
    # the IdP has not synced, rows per page of the user list, and how many
    # entries of a user's provisioning history are shown (newest first).
    web_session_hours: int = 12
    scim_stale_hours: int = 2
    web_page_size: int = 50
    user_history_limit: int = 200

    def __post_init__(self) -> None:
        if not 0 < self.stripe_timeout <= 20:
            # Stripe's own guidance: a request with no answer after this is lost.
            raise SettingsError(f"stripe_timeout must be in (0, 20] seconds, got {self.stripe_timeout}")
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{Path(self.var_dir) / 'sally.db'}")
        object.__setattr__(self, "database_url", normalise_database_url(self.database_url))
        object.__setattr__(self, "public_base_url", self.public_base_url.rstrip("/"))
        object.__setattr__(self, "var_dir", Path(self.var_dir))
        if (
            self.smtp_url
            and urlsplit(self.smtp_url).scheme.lower() == "smtp"
            and url_has_credentials(self.smtp_url)
            and not self.smtp_allow_plaintext_auth
        ):
            raise SettingsError(
                "SMTP_URL carries credentials but no TLS: use smtp+starttls:// or smtps://, "
                "or set SMTP_ALLOW_PLAINTEXT_AUTH=true to send them in clear text"
            )

    def __repr__(self) -> str:
        # Secrets never reach a log line or a traceback through repr(settings).
        secret = {
            "admin_token": MASK if self.admin_token else None,
            "stripe_api_key": MASK if self.stripe_api_key else None,
            "database_url": mask_url(self.database_url),
            "redis_url": mask_url(self.redis_url),
            "smtp_url": mask_url(self.smtp_url),
        }
        shown = ", ".join(
            f"{f.name}={(secret[f.name] if f.name in secret else getattr(self, f.name))!r}" for f in fields(self)
        )
        return f"Settings({shown})"

    def secrets(self) -> list[str]:
        """Every secret value these settings hold (for the log filter that masks them)."""
        values = [self.admin_token, self.stripe_api_key]
        for url in (self.database_url, self.redis_url, self.smtp_url):
            try:
                password = urlsplit(url).password if url else None
            except ValueError:
                password = None
            if password:
                # As written in the URL and as sent on the wire (percent-decoded).
                values += [password, unquote(password)]
        return sorted({value for value in values if value}, key=len, reverse=True)

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
            smtp_allow_plaintext_auth=_flag(env, "SMTP_ALLOW_PLAINTEXT_AUTH"),
            mail_from=get("MAIL_FROM") or "Sally <no-reply@localhost>",
            host=get("HOST") or "127.0.0.1",
            port=_int(env, "PORT", 8000, 1),
            web_processes=_int(env, "WEB_PROCESSES", 1, 1),
            web_malloc_arenas=_int(env, "WEB_MALLOC_ARENAS", 2, 0),
            web_malloc_mmap_threshold=_int(env, "WEB_MALLOC_MMAP_THRESHOLD", 128 * 1024, 0),
            worker_processes=_int(env, "WORKER_PROCESSES", 1, 1),
            worker_threads=_int(env, "WORKER_THREADS", 8, 1),
            max_body_bytes=_int(env, "SCIM_MAX_BODY_BYTES", 2 * 1024 * 1024, 1024),
            scim_rate_limit=_int(env, "SCIM_RATE_LIMIT", 200, 0),
            scim_auth_failure_limit=_int(env, "SCIM_AUTH_FAILURE_LIMIT", 30, 0),
            web_signin_failure_limit=_int(env, "WEB_SIGNIN_FAILURE_LIMIT", 10, 0),
            scim_limits=ScimLimits.from_env(env),
            scim_create_batch_max=_int(env, "SCIM_CREATE_BATCH_MAX", 64, 1),
            database_statement_timeout=_seconds(env, "DATABASE_STATEMENT_TIMEOUT", 30.0, 0.0),
            database_connect_timeout=_seconds(env, "DATABASE_CONNECT_TIMEOUT", 10.0, 1.0),
            # Not in CONTRACT.md: tests shorten the sweep to keep crash recovery quick.
            sweep_interval=_seconds(env, "SALLY_SWEEP_INTERVAL", 10.0, 0.5),
            # Not in CONTRACT.md either: tests shorten the lease to see one lapse.
            purchase_lease=_seconds(env, "SALLY_PURCHASE_LEASE", 30.0, 1.0),
            redis_namespace=get("SALLY_REDIS_NAMESPACE") or "sally",
            stripe_webhook_secret=get("STRIPE_WEBHOOK_SECRET"),
            stripe_timeout=_seconds(env, "STRIPE_TIMEOUT", 20.0, 1.0, maximum=20.0),
            stripe_resync_interval=_seconds(env, "STRIPE_RESYNC_INTERVAL", 900.0, 1.0),
            purchase_threads=_int(env, "PURCHASE_THREADS", 4, 1),
            stripe_update_spacing=_seconds(env, "STRIPE_UPDATE_SPACING", 2.0, 0.0),
            redis_connect_timeout=_seconds(env, "REDIS_CONNECT_TIMEOUT", 1.0, 0.05),
            redis_socket_timeout=_seconds(env, "REDIS_SOCKET_TIMEOUT", 1.0, 0.05),
            quarantine_after=_int(env, "SALLY_QUARANTINE_AFTER", 5, 1),
            quarantine_backoff=_seconds(env, "SALLY_QUARANTINE_BACKOFF", 60.0, 1.0),
            quarantine_max_backoff=_seconds(env, "SALLY_QUARANTINE_MAX_BACKOFF", 3600.0, 1.0),
            invite_daily_cap=_int(env, "INVITE_DAILY_CAP", 50_000, 1),
            hold_min_users=_int(env, "DEPROVISION_HOLD_MIN_USERS", 10, 0),
            hold_percent=_percent(env, "DEPROVISION_HOLD_PERCENT", 20),
            hold_window=_seconds(env, "DEPROVISION_HOLD_WINDOW", 3600.0, 0.0),
            web_session_hours=_int(env, "WEB_SESSION_HOURS", 12, 1),
            scim_stale_hours=_int(env, "SCIM_STALE_HOURS", 2, 1),
            web_page_size=_int(env, "WEB_PAGE_SIZE", 50, 1),
            user_history_limit=_int(env, "USER_HISTORY_LIMIT", 200, 1),
        )
