"""The Starlette app factory: SCIM receiver, admin API, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api.admin import AdminApi, admin_error_response
from api.metrics import MetricsMiddleware, PipelineCollector, WebMetrics
from api.scim.endpoints import ScimApi
from api.scim.errors import (
    DATABASE_RETRY_AFTER_SECONDS,
    DATABASE_UNAVAILABLE,
    ScimError,
    database_unavailable_error,
)
from api.scim.http import error_response
from api.scim.ratelimit import REDIS_ERRORS, RedisPerLoop
from api.tenants import TenantError
from api.web.pages import WebPages
from api.webhooks import StripeWebhooks
from models.db import database_unavailable, engine_from_settings
from models.settings import Settings
from workers.broker import make_broker, redis_client, resolve_redis_url
from workers.names import PURCHASE_SEATS, QUEUES
from workers.telemetry import Telemetry, queue_counts, stripe_alert_key
from workers.wakeup import PENDING_TTL_SECONDS, Waker, pending_key

log = logging.getLogger(__name__)

# /readyz answers within this, whatever hangs behind it (a stalled Redis, a dead database host).
READY_PROBE_SECONDS = 2.0


class Services:
    """The outside things the app talks to, made once per process and handed in."""

    def __init__(
        self,
        engine: Engine,
        wake: Callable[[str], Any],
        ping_broker: Callable[[], bool],
        pipeline_stats: Callable[[], dict[str, Any]] | None = None,
        redis_url: str | None = None,
        wake_async: Callable[[str], Awaitable[Any]] | None = None,
        send_purchase: Callable[[str], Any] | None = None,
        stripe_alert: Callable[[], str | None] | None = None,
        close_async: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.engine = engine
        self.wake = wake
        self.ping_broker = ping_broker
        self.pipeline_stats = pipeline_stats
        self.redis_url = redis_url
        # The same wake-up for the event loop (the async hot path), when there is one.
        self.wake_async = wake_async
        self.send_purchase = send_purchase
        self.stripe_alert = stripe_alert
        # Closes what the event loop's side opened (wake_async's Redis client), at the app's shutdown.
        self.close_async = close_async

    @classmethod
    def from_settings(cls, settings: Settings) -> "Services":
        url = resolve_redis_url(settings)
        client = redis_client(url, settings)
        broker = make_broker(settings, url)
        waker = Waker(broker, client, settings.redis_namespace)
        telemetry = Telemetry(client, settings.redis_namespace)

        def stats() -> dict[str, Any]:
            counts = queue_counts(client, broker.namespace, QUEUES)
            return {
                "jobs": telemetry.jobs(),
                "stripe": telemetry.stripe_calls(),
                "queues": counts["waiting"],
                "delayed": counts["delayed"],
                "dead": counts["dead"],
            }

        def ping() -> bool:
            return bool(client.ping())

        def send_purchase(purchase_id: str) -> None:
            # By actor name: the web process never imports the actors. A lost message
            # is re-sent by the sweep (the purchase row is the truth).
            try:
                waker.enqueue(PURCHASE_SEATS, purchase_id)
            except Exception:  # noqa: BLE001 - the approval is committed; the sweep delivers it
                log.warning("could not enqueue purchase %s; the sweep will", purchase_id)

        def stripe_alert() -> str | None:
            try:
                value = client.get(stripe_alert_key(settings.redis_namespace))
            except Exception:  # noqa: BLE001 - readiness reports what it can
                return None
            return value.decode() if value else None

        flags = RedisPerLoop(url, connect_timeout=settings.redis_connect_timeout,
                             socket_timeout=settings.redis_socket_timeout)

        async def wake_async(tenant_id: str) -> bool:
            # The coalescing flag on the loop; the rare message itself (once per
            # reconcile, not per write) goes through the broker in the thread pool.
            if not (flags.available() and waker.available()):
                return False  # Redis failed moments ago: the sweep delivers this one
            try:
                claimed = await flags.set_flag(pending_key(settings.redis_namespace, tenant_id), PENDING_TTL_SECONDS)
            except REDIS_ERRORS as exc:
                flags.failed()
                log.warning("could not enqueue reconcile for tenant %s (%s); the sweep will", tenant_id, type(exc).__name__)
                return False
            return bool(claimed) and await run_in_threadpool(waker.send_claimed, tenant_id)

        return cls(
            engine_from_settings(settings), waker.wake, ping, stats, url, WakeBatcher(wake_async).wake,
            send_purchase=send_purchase, stripe_alert=stripe_alert, close_async=flags.close,
        )


class WakeBatcher:
    """Concurrent wake-ups of one tenant share one Redis round trip (a group commit for wake-ups).

    A request joins the batch only after its own commit, and a batch is sent
    only after everyone in it joined, so every write in a batch committed before
    its flag was set: the reconcile that clears the flag reads them all.
    """

    def __init__(self, wake_one: Callable[[str], Awaitable[bool]]) -> None:
        self.wake_one = wake_one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next: dict[str, asyncio.Future[bool]] = {}
        self._sending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def wake(self, tenant_id: str) -> bool:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._next, self._sending, self._tasks = loop, {}, set(), set()
        batch = self._next.get(tenant_id)
        if batch is None:
            batch = self._next[tenant_id] = loop.create_future()
            if tenant_id not in self._sending:
                self._sending.add(tenant_id)
                task = loop.create_task(self._send(tenant_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(batch)

    async def _send(self, tenant_id: str) -> None:
        try:
            while (batch := self._next.pop(tenant_id, None)) is not None:
                try:
                    woke = await self.wake_one(tenant_id)
                except Exception:  # noqa: BLE001 - the write is committed; the sweep is the fallback
                    log.exception("wake-up of tenant %s failed; the sweep will deliver it", tenant_id)
                    woke = False
                batch.set_result(woke)
        finally:
            self._sending.discard(tenant_id)


class HotRoutes:
    """`POST …/Users` and `PATCH …/Groups/{id}` on PostgreSQL straight to their endpoint, around Starlette.

    An IdP's first cycle is these two requests; the router's walk over every
    route, the middleware stack and its wrapped `send` were a sizeable part of
    each one's CPU (bench/README.md). The endpoint, its errors and its metrics
    are the same as through the app; everything else goes to the app.
    """

    def __init__(self, app: ASGIApp, scim: ScimApi, metrics: WebMetrics) -> None:
        self.app = app
        self.scim = scim
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            hot = self.scim.hot_route(scope["method"], scope["path"])
            if hot is not None:
                await self._serve(scope, receive, send, *hot)
                return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, template: str, params: dict[str, str],
                     endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        started = time.perf_counter()
        status = 500
        try:
            scope["path_params"] = params
            request = Request(scope, receive, send)
            try:
                response = await endpoint(request)
            except Exception as exc:  # noqa: BLE001 - answered by the app's own handler, as through the app
                handler = self._handler_for(exc)
                if handler is None:
                    raise
                response = await handler(request, exc)
            status = response.status_code
            await response(scope, receive, send)
        finally:
            self.metrics.observe(scope["method"], template, status, time.perf_counter() - started)

    def _handler_for(self, exc: Exception) -> Callable[[Request, Exception], Awaitable[Response]] | None:
        # The most specific handler registered on the app, as Starlette looks it up.
        handlers = self.app.exception_handlers
        return next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)

    def __getattr__(self, name: str) -> Any:
        # `app.state`, `app.router`, … as on the Starlette app (tests and the CLI use them).
        return getattr(self.app, name)


def create_app(settings: Settings, services: Services | None = None) -> "Starlette | HotRoutes":
    """Build the ASGI app; nothing connects at import time."""
    services = services or Services.from_settings(settings)
    metrics = WebMetrics()
    if services.pipeline_stats is not None:
        metrics.registry.register(PipelineCollector(services.pipeline_stats))
    scim = ScimApi(settings, services.engine, services.wake, wake_async=services.wake_async,
                   redis_url=services.redis_url)
    admin = AdminApi(settings, services.engine, services.wake, services.send_purchase)
    webhooks = StripeWebhooks(settings, services.engine, services.wake)
    pages = WebPages(settings, services.engine, services.wake, services.send_purchase, redis_url=services.redis_url)

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def _ping_database() -> bool:
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True

    async def _probe(check: Callable[[], Any]) -> str | None:
        """None when the check answers, else a short reason: an exception's class name, never its
        text (a driver's message can hold a host, a user or SQL)."""
        try:
            answered = await asyncio.wait_for(run_in_threadpool(check), READY_PROBE_SECONDS)
        except asyncio.TimeoutError:
            return f"no answer within {READY_PROBE_SECONDS:g} s"
        except Exception as error:  # noqa: BLE001 - any failure means "not ready"
            return type(error).__name__
        return None if answered else "no answer"

    async def readyz(_request: Request) -> Response:
        database, broker = await asyncio.gather(_probe(_ping_database), _probe(services.ping_broker))
        ready = database is None and broker is None
        body: dict[str, Any] = {
            "status": "ready" if ready else "not ready", "database": database is None, "broker": broker is None,
        }
        down = {name: reason for name, reason in (("database", database), ("broker", broker)) if reason}
        if down:
            body["down"] = down
        if services.stripe_alert is not None:
            alert = await run_in_threadpool(services.stripe_alert)
            # An operator alert, not unreadiness: SCIM keeps working without Stripe,
            # so a refused API key must not take the web process out of service.
            body["stripe"] = {"ok": alert is None, "detail": alert}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_endpoint(_request: Request) -> Response:
        body = await run_in_threadpool(metrics.render)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    async def on_scim_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ScimError)
        return error_response(exc)

    async def on_admin_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TenantError)
        return admin_error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/scim/"):
            scim_exc = ScimError(exc.detail or "Not found.")
            scim_exc.status = exc.status_code
            return error_response(scim_exc)
        return JSONResponse({"error": "http_error", "detail": exc.detail}, status_code=exc.status_code)

    async def on_database_error(request: Request, exc: Exception) -> Response:
        # The one place a database outage becomes a 503 (SCIM and admin alike). The
        # transaction rolled back, so the same request may be sent again; only when the
        # connection died during COMMIT may it have landed, and a resent create then
        # answers 409 (the IdP looks the user up, as Entra does).
        if not database_unavailable(exc):
            return await on_crash(request, exc)
        log.warning("database unavailable on %s %s (%s); answered 503", request.method, request.url.path,
                    type(exc).__name__)
        if request.url.path.startswith("/scim/"):
            return error_response(database_unavailable_error())
        return JSONResponse(
            {"error": "unavailable", "detail": DATABASE_UNAVAILABLE},
            status_code=503, headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
        )

    async def on_crash(request: Request, exc: Exception) -> Response:
        # Never a traceback or a secret in the body; the log has the details.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        if request.url.path.startswith("/scim/"):
            crash = ScimError("Internal server error.")
            crash.status = 500
            return error_response(crash)
        return JSONResponse({"error": "internal", "detail": "Internal server error."}, status_code=500)

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        *scim.routes(),
        *admin.routes(),
        *webhooks.routes(),
        *pages.routes(),
    ]
    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await scim.close()
        await pages.close()
        if services.close_async is not None:
            await services.close_async()

    app = Starlette(
        lifespan=lifespan,
        routes=routes,
        exception_handlers={
            ScimError: on_scim_error,
            TenantError: on_admin_error,
            HTTPException: on_http_error,
            sa_exc.DBAPIError: on_database_error,
            sa_exc.TimeoutError: on_database_error,
            Exception: on_crash,
        },
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.metrics = metrics
    app.state.services = services
    if scim.fast is None:
        return app
    return HotRoutes(app, scim, metrics)
