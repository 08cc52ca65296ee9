"""The admin page's routes: sign-in, tenants, SCIM setup, mapping with preview, users, billing, sync, audit.

Plain HTML forms (no JavaScript needed) over the service functions the admin
API uses (api/service.py, api/views.py): the page never calls the API over
HTTP and holds no business rule of its own.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, quote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from api import service, tenants, views
from api.scim.ratelimit import RedisPerLoop
from api.tenants import PROVIDERS, TenantError
from api.throttle import FailureWindow
from api.tokens import same_secret
from api.web.idps import IDPS
from api.web.session import COOKIE, SessionCodec, WebSession
from billing.preview import format_money
from models.db import session_scope
from models.settings import TIERS, Settings
from models.tables import Tenant, as_utc

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 256 * 1024
ACTOR = service.PAGE_ACTOR
SECURITY_HEADERS = {
    # Tokens are shown on these pages: nothing is cached, framed or sent on as a referrer.
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
DONE = {
    "created": "Tenant created. Choose the identity provider to set up SCIM.",
    "disconnected": "SCIM is disconnected: the token no longer works. Provisioned users stay until you remove them.",
    "saved": "Mapping saved. The pipeline is applying it now (see Sync).",
    "removed": "User removed. Their license is freed by the pipeline.",
    "approved": "Purchase approved: it is sent to Stripe shortly.",
    "rejected": "Purchase rejected: nothing is bought; the users keep waiting with the reason.",
    "cancelled": "Purchase cancelled: nothing is bought; the users keep waiting with the reason.",
    "linked": "Billing linked, not verified yet: a worker checks it against Stripe and reads the seats bought.",
}
GUARD_LABELS = {
    "min_seats": "seats per purchase",
    "percent": "percent of the seats bought",
    "first_purchase_seats": "first purchase seats",
}
Handler = Callable[[Request, WebSession], Awaitable[Response]]


def _when(value: str | datetime | None) -> str:
    """An ISO time as the page shows it: 2026-12-02 00:10 UTC."""
    if value is None:
        return "—"
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
    return as_utc(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


class PageError(Exception):
    """A request the page answers with a message (bad form, expired session), never a 500."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class WebPages:
    """The admin page inside the web process; ``routes()`` goes into the app beside the APIs."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        wake: Callable[[str], Any],
        send_purchase: Callable[[str], Any] | None = None,
        redis_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        # WEB_SIGNIN_FAILURE_LIMIT, counted in Redis like SCIM's failed authentications (off without Redis).
        self.signin_failures = FailureWindow(
            RedisPerLoop(redis_url, connect_timeout=settings.redis_connect_timeout,
                         socket_timeout=settings.redis_socket_timeout) if redis_url else None,
            settings.redis_namespace, "signinfail", settings.web_signin_failure_limit,
        )
        # Enqueues purchase_seats after an approval commits, as the admin API does (the sweep is the fallback).
        self.send_purchase = send_purchase
        self.wake = wake
        self.codec = SessionCodec(settings.admin_token, settings.web_session_hours * 3600)
        self.secure = settings.public_base_url.startswith("https://")
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = _when
        self.env.filters["money"] = format_money
        self.env.globals.update(TIERS=TIERS, IDPS=IDPS, PROVIDERS=PROVIDERS)

    def routes(self) -> list[BaseRoute]:
        t = "/tenants/{t}"
        return [
            Route("/", self.page(self.home, auth=False), methods=["GET"]),
            Route("/login", self.page(self.login, auth=False), methods=["GET", "POST"]),
            Route("/logout", self.page(self.logout, auth=False), methods=["GET", "POST"]),
            Route("/tenants", self.page(self.create_tenant), methods=["POST"]),
            Route(t, self.page(self.tenant_home), methods=["GET"]),
            Route(t + "/scim", self.page(self.scim), methods=["GET"]),
            Route(t + "/scim/connect", self.page(self.connect), methods=["POST"]),
            Route(t + "/scim/rotate", self.page(self.rotate), methods=["POST"]),
            Route(t + "/scim/disconnect", self.page(self.disconnect), methods=["GET", "POST"]),
            Route(t + "/mapping", self.page(self.mapping), methods=["GET", "POST"]),
            Route(t + "/users", self.page(self.users), methods=["GET"]),
            Route(t + "/users/{id}", self.page(self.user), methods=["GET"]),
            Route(t + "/users/{id}/remove", self.page(self.remove_user), methods=["GET", "POST"]),
            Route(t + "/billing", self.page(self.billing), methods=["GET", "POST"]),
            Route(t + "/purchases/{id}/{decision}", self.page(self.decide_purchase), methods=["POST"]),
            Route(t + "/sync", self.page(self.sync), methods=["GET"]),
            Route(t + "/audit", self.page(self.audit), methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    # ------------------------------------------------------------ plumbing

    def page(self, handler: Handler, *, auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            session = self.codec.loads(request.cookies.get(COOKIE))
            fresh = session is None
            if session is None:
                session = WebSession.fresh(self.codec.lifetime)
            try:
                if any("\x00" in value for value in request.path_params.values()):
                    raise PageError(404, "Not found.")
                if request.method == "POST":
                    form = await self._form(request)
                    request.state.form = form
                    # One CSRF token per session, checked on every POST (sign-in included).
                    if fresh or not session.csrf_ok(form.get("csrf")):
                        raise PageError(400, "Your session expired or the form is stale. Reload the page and try again.")
                else:
                    request.state.form = {}
                if auth and not session.signed_in:
                    response: Response = RedirectResponse("/", status_code=303)
                else:
                    response = await handler(request, session)
            except (PageError, TenantError) as error:
                status = error.status
                response = self.render(
                    request, session, "error.html", {"status": status, "detail": error.detail}, status=status
                )
            except Exception:
                # The log has the details; the page never shows a traceback or a secret.
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                response = self.render(
                    request, session, "error.html", {"status": 500, "detail": "Something went wrong."}, status=500
                )
            new_session = getattr(request.state, "new_session", None)
            if new_session is not None or fresh:
                self._set_cookie(response, new_session or session)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return serve

    async def _form(self, request: Request) -> dict[str, Any]:
        """The urlencoded body: repeated names become lists (checkbox groups)."""
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_FORM_BYTES:
                raise PageError(413, "The form is too large.")
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise PageError(400, "The form is not valid UTF-8.") from None
        form: dict[str, Any] = {}
        for key, value in pairs:
            if "\x00" in key or "\x00" in value:
                raise PageError(400, "The form may not contain U+0000.")
            form.setdefault(key, []).append(value)
        return {key: values[0] if len(values) == 1 else values for key, values in form.items()}

    @staticmethod
    def _list(form: dict[str, Any], name: str) -> list[str]:
        value = form.get(name)
        if value is None:
            return []
        return value if isinstance(value, list) else [value]

    @staticmethod
    def _one(form: dict[str, Any], name: str) -> str:
        value = form.get(name, "")
        return value[0] if isinstance(value, list) else value

    def _set_cookie(self, response: Response, session: WebSession) -> None:
        response.set_cookie(
            COOKIE, self.codec.dumps(session), max_age=self.codec.lifetime, path="/",
            httponly=True, samesite="strict", secure=self.secure,
        )

    def render(
        self, request: Request, session: WebSession, template: str, context: dict[str, Any], status: int = 200
    ) -> HTMLResponse:
        new = getattr(request.state, "new_session", None)
        html = self.env.get_template(template).render(
            csrf=(new or session).csrf,
            signed_in=(new or session).signed_in,
            path=request.url.path,
            done=DONE.get(request.query_params.get("done", "")),
            **context,
        )
        return HTMLResponse(html, status_code=status)

    async def db(self, work: Callable[[Session], Any]) -> Any:
        """Run ``work`` in one transaction in the thread pool."""

        def run() -> Any:
            with session_scope(self.engine) as session:
                return work(session)

        return await run_in_threadpool(run)

    async def tenant_page(
        self, request: Request, session: WebSession, template: str, tab: str,
        work: Callable[[Session, Tenant], dict[str, Any]], status: int = 200,
    ) -> Response:
        """A page about one tenant: loads it (404 when unknown), runs ``work`` in the same transaction."""
        tenant_id = request.path_params["t"]

        def load(db: Session) -> dict[str, Any]:
            tenant = tenants.get_tenant(db, tenant_id)
            context = work(db, tenant)
            context.setdefault("tenant", tenant)
            return context

        context = await self.db(load)
        if isinstance(context, Response):
            return context
        context["tab"] = tab
        return self.render(request, session, template, context, status=status)

    # ------------------------------------------------------------ sign-in

    async def home(self, request: Request, session: WebSession) -> Response:
        if not session.signed_in:
            return self.render(request, session, "login.html", {"configured": bool(self.settings.admin_token)})
        rows = await self.db(service.list_tenants)
        return self.render(request, session, "tenants.html", {"tenants": rows})

    async def close(self) -> None:
        """The app's shutdown: close the sign-in throttle's Redis client in its own loop."""
        if self.signin_failures.redis is not None:
            await self.signin_failures.redis.close()

    async def login(self, request: Request, session: WebSession) -> Response:
        if request.method == "GET":
            return RedirectResponse("/", status_code=303)
        address = request.client.host if request.client else None
        # An address past WEB_SIGNIN_FAILURE_LIMIT waits out the minute: its attempts are not even checked,
        # so guessing the token gets at most that many tries per minute and address.
        wait = await self.signin_failures.blocked(address)
        if wait is None:
            token = self._one(request.state.form, "token").strip()
            # Constant-time compare (hmac.compare_digest), like the admin API's bearer check.
            if same_secret(token, self.settings.admin_token):
                # A new session (and CSRF token) on sign-in: a token planted before it is worthless.
                request.state.new_session = WebSession.fresh(self.codec.lifetime, signed_in=True)
                return RedirectResponse("/", status_code=303)
            wait = await self.signin_failures.failed(address)
        if wait is None:
            return self.render(
                request, session, "login.html",
                {"configured": bool(self.settings.admin_token), "error": "That is not the admin token."}, status=401,
            )
        log.warning("admin page: too many failed sign-ins from %s; refused for %d s", address or "-", wait)
        response = self.render(
            request, session, "login.html",
            {"configured": bool(self.settings.admin_token),
             "error": f"Too many failed sign-ins from this address. Try again in {wait} seconds."}, status=429,
        )
        response.headers["Retry-After"] = str(wait)
        return response

    async def logout(self, request: Request, session: WebSession) -> Response:
        if request.method == "GET":
            # Signing out changes state: only a POST with the CSRF token does it.
            return RedirectResponse("/", status_code=303)
        request.state.new_session = WebSession.fresh(self.codec.lifetime)
        return RedirectResponse("/", status_code=303)

    # ------------------------------------------------------------ tenants

    async def create_tenant(self, request: Request, session: WebSession) -> Response:
        form = request.state.form
        customer = self._one(form, "stripe_customer_id").strip() or None
        subscription = self._one(form, "stripe_subscription_id").strip() or None
        if bool(customer) != bool(subscription):
            raise PageError(400, "A Stripe customer id and a subscription id go together (or leave both empty).")
        tenant_id = await self.db(
            lambda db: service.create_tenant(db, ACTOR, self._one(form, "name"), customer, subscription).id
        )
        if subscription:
            await run_in_threadpool(self.wake, tenant_id)
        return RedirectResponse(f"/tenants/{quote(tenant_id)}/scim?done=created", status_code=303)

    async def tenant_home(self, request: Request, session: WebSession) -> Response:
        return RedirectResponse(f"/tenants/{quote(request.path_params['t'])}/scim", status_code=303)

    # ------------------------------------------------------------ SCIM setup

    def _scim_context(self, db: Session, tenant: Tenant) -> dict[str, Any]:
        return {
            "scim": service.scim_state(self.settings, tenant),
            "stale_hours": self.settings.scim_stale_hours,
            "groups_seen": len(service.group_rows(db, tenant)),
        }

    async def scim(self, request: Request, session: WebSession) -> Response:
        return await self.tenant_page(request, session, "scim.html", "scim", self._scim_context)

    async def connect(self, request: Request, session: WebSession) -> Response:
        provider = self._one(request.state.form, "provider")

        def work(db: Session, tenant: Tenant) -> dict[str, Any]:
            credentials = service.connect_scim(db, self.settings, ACTOR, tenant, provider)
            return {**self._scim_context(db, tenant), "credentials": credentials}

        # The token is in this response only (never in a URL or a redirect).
        return await self.tenant_page(request, session, "scim.html", "scim", work, status=201)

    async def rotate(self, request: Request, session: WebSession) -> Response:
        def work(db: Session, tenant: Tenant) -> dict[str, Any]:
            credentials = service.rotate_token(db, self.settings, ACTOR, tenant)
            return {**self._scim_context(db, tenant), "credentials": credentials, "rotated": True}

        return await self.tenant_page(request, session, "scim.html", "scim", work)

    async def disconnect(self, request: Request, session: WebSession) -> Response:
        if request.method == "GET":
            return await self.tenant_page(
                request, session, "confirm_disconnect.html", "scim", lambda db, tenant: self._scim_context(db, tenant)
            )
        await self.db(lambda db: service.disconnect_scim(db, ACTOR, tenants.get_tenant(db, request.path_params["t"])))
        return RedirectResponse(f"/tenants/{quote(request.path_params['t'])}/scim?done=disconnected", status_code=303)

    # ------------------------------------------------------------ mapping

    def _config_from_form(self, form: dict[str, Any]) -> dict[str, Any]:
        """The form's choices as the admin API's config body (CONTRACT.md)."""
        license_groups: dict[str, list[str]] = {tier: [] for tier in TIERS}
        for key, value in form.items():
            if key.startswith("tier:") and isinstance(value, str) and value:
                if value not in TIERS:
                    raise PageError(400, f"Unknown license tier '{value}'.")
                license_groups[value].append(key[len("tier:"):])
        seat_cap: dict[str, int] = {}
        for tier in TIERS:
            raw = self._one(form, f"cap:{tier}").strip()
            if raw:
                if not raw.isdigit() or len(raw) > 9:
                    raise PageError(400, f"The {tier} seat cap must be a whole number of seats (or empty: no cap).")
                seat_cap[tier] = int(raw)
        config: dict[str, Any] = {
            "user_groups": self._list(form, "user"),
            "admin_groups": self._list(form, "admin"),
            "license_groups": license_groups,
            "auto_invite": self._one(form, "auto_invite") == "on",
            "seat_cap": seat_cap or None,
        }
        if self._one(form, "guard") == "1":
            # The config is replaced, not merged: the form carries the spend guard so
            # that saving the mapping keeps it (a config without one takes the defaults).
            spend_guard: dict[str, Any] = {"enabled": self._one(form, "guard_enabled") == "on"}
            for name, label in GUARD_LABELS.items():
                raw = self._one(form, f"guard_{name}").strip()
                if not raw.isdigit() or len(raw) > 9:
                    raise PageError(400, f"The spend guard's {label} must be a whole number.")
                spend_guard[name] = int(raw)
            config["spend_guard"] = spend_guard
        return config

    async def mapping(self, request: Request, session: WebSession) -> Response:
        form = request.state.form
        action = self._one(form, "action") if request.method == "POST" else ""
        config = self._config_from_form(form) if request.method == "POST" else None

        def work(db: Session, tenant: Tenant) -> dict[str, Any]:
            context: dict[str, Any] = {}
            if action == "preview" and config is not None:
                context["preview"] = service.preview_json(*service.preview_config(db, self.settings, tenant, config))
            elif config is not None:
                raise PageError(400, "Choose Preview or Save.")
            context.update(
                groups=service.group_rows(db, tenant),
                config=config or service.get_config(db, tenant, self.settings),
                billed=bool(self.settings.stripe_api_key and tenant.stripe_subscription_id),
            )
            return context

        tenant_id = request.path_params["t"]
        if action == "save":

            def save(db: Session) -> None:
                tenant = tenants.get_tenant(db, tenant_id)
                # The form edits the mapping only: the tenant's other settings (limits,
                # guard) are kept as they are, never reset by a Save of this page.
                current = service.get_config(db, tenant, self.settings)
                kept = {key: value for key, value in current.items() if key not in config and key != "effective"}
                service.save_config(db, ACTOR, tenant, {**kept, **config}, self.settings)

            await self.db(save)
            await run_in_threadpool(self.wake, tenant_id)
            return RedirectResponse(f"/tenants/{quote(tenant_id)}/sync?done=saved", status_code=303)
        return await self.tenant_page(request, session, "mapping.html", "mapping", work)

    # ------------------------------------------------------------ users

    async def users(self, request: Request, session: WebSession) -> Response:
        query = request.query_params.get("q", "")[:200].replace("\x00", "")
        try:
            # Bounded: an absurd page number is the last page's neighbour, not a database error.
            page = min(max(1, int(request.query_params.get("page", "1")[:12])), 10**9)
        except ValueError:
            page = 1
        size = self.settings.web_page_size

        def work(db: Session, tenant: Tenant) -> dict[str, Any]:
            rows, total = service.user_page(db, tenant, query, page, size)
            pages = max(1, math.ceil(total / size))
            return {
                "users": rows, "total": total, "page": page, "pages": pages, "q": query,
                "prev_url": "?" + urlencode({"q": query, "page": page - 1}) if page > 1 else None,
                "next_url": "?" + urlencode({"q": query, "page": page + 1}) if page < pages else None,
            }

        return await self.tenant_page(request, session, "users.html", "users", work)

    async def user(self, request: Request, session: WebSession) -> Response:
        user_id = request.path_params["id"]
        return await self.tenant_page(
            request, session, "user.html", "users",
            lambda db, tenant: {"user": service.user_detail(db, self.settings, tenant, user_id)},
        )

    async def remove_user(self, request: Request, session: WebSession) -> Response:
        user_id = request.path_params["id"]
        tenant_id = request.path_params["t"]
        if request.method == "GET":
            return await self.tenant_page(
                request, session, "confirm_remove.html", "users",
                lambda db, tenant: {"user": service.user_detail(db, self.settings, tenant, user_id)},
            )
        await self.db(lambda db: service.remove_user(db, ACTOR, tenants.get_tenant(db, tenant_id), user_id))
        await run_in_threadpool(self.wake, tenant_id)
        return RedirectResponse(f"/tenants/{quote(tenant_id)}/users?done=removed", status_code=303)

    # ------------------------------------------------------------ billing, sync, audit

    async def billing(self, request: Request, session: WebSession) -> Response:
        tenant_id = request.path_params["t"]
        if request.method == "POST":
            form = request.state.form
            await self.db(lambda db: service.link_billing(
                db, ACTOR, tenants.get_tenant(db, tenant_id),
                self._one(form, "stripe_customer_id"), self._one(form, "stripe_subscription_id"),
            ))
            await run_in_threadpool(self.wake, tenant_id)
            return RedirectResponse(f"/tenants/{quote(tenant_id)}/billing?done=linked", status_code=303)

        def work(db: Session, tenant: Tenant) -> dict[str, Any]:
            return {
                "link": service.billing_state(tenant),
                "licenses": views.licenses(db, tenant),
                "purchases": list(reversed(views.purchases(db, tenant.id))),
                "billed": bool(self.settings.stripe_api_key and tenant.stripe_subscription_id),
                "stripe_configured": bool(self.settings.stripe_api_key),
                "live_dashboard": not (self.settings.stripe_api_key or "").startswith("sk_test_"),
            }

        return await self.tenant_page(request, session, "billing.html", "billing", work)

    async def decide_purchase(self, request: Request, session: WebSession) -> Response:
        """Approve, reject or cancel a purchase the spend guard holds (the admin API's service function)."""
        tenant_id, purchase_id = request.path_params["t"], request.path_params["id"]
        decision = request.path_params["decision"]
        if decision not in service.DECIDED:
            raise PageError(404, "Not found.")
        row = await self.db(lambda db: service.decide_purchase(
            db, ACTOR, tenants.get_tenant(db, tenant_id), purchase_id, decision
        ))
        await run_in_threadpool(self.wake, tenant_id)
        if self.send_purchase is not None and row["status"] == "pending":
            await run_in_threadpool(self.send_purchase, row["id"])
        return RedirectResponse(f"/tenants/{quote(tenant_id)}/billing?done={service.DECIDED[decision]}", status_code=303)

    async def sync(self, request: Request, session: WebSession) -> Response:
        def work(db: Session, tenant: Tenant) -> dict[str, Any]:
            state = views.sync_state(db, tenant)
            pending = (
                state["events_applied"] < state["events_total"]
                or state["pending_purchases"] > 0
                or state["pending_invitations"] > 0
            )
            return {"sync": state, "pending": pending, "licenses": views.licenses(db, tenant)}

        return await self.tenant_page(request, session, "sync.html", "sync", work)

    async def audit(self, request: Request, session: WebSession) -> Response:
        return await self.tenant_page(
            request, session, "audit.html", "audit",
            lambda db, tenant: {
                "entries": service.audit_rows(db, tenant),
                "names": {g["id"]: g["displayName"] for g in service.group_rows(db, tenant)},
            },
        )
