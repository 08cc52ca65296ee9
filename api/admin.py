"""The admin API under /admin/api: tenants, SCIM connection, mapping, users, seats, sync."""

from __future__ import annotations

import logging
from typing import Any, Callable

import orjson
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api import service, tenants, views
from api.service import AdminError
from api.tenants import TenantError
from api.tokens import bearer, same_secret
from billing import ledger
from billing.locks import lock_tenant
from models.db import database_unavailable, session_scope
from models.settings import Settings
from models.tables import Tenant, utcnow
from workers import deprovision

log = logging.getLogger(__name__)

MAX_ADMIN_BODY = 1024 * 1024

AdminHandler = Callable[..., Any]


def admin_error_response(exc: TenantError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)


class AdminApi:
    """JSON in and out; every change that can alter access appends a sync event in its transaction."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        wake: Callable[[str], Any],
        send_purchase: Callable[[str], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.wake = wake
        # Enqueues purchase_seats after an approval commits (the sweep is the fallback).
        self.send_purchase = send_purchase

    def routes(self) -> list[Route]:
        p = "/admin/api"
        return [
            Route(p + "/tenants", self.endpoint(self.list_tenants), methods=["GET"]),
            Route(p + "/tenants", self.endpoint(self.create_tenant, status=201, wakes=True), methods=["POST"]),
            Route(p + "/tenants/{t}/scim", self.endpoint(self.get_scim), methods=["GET"]),
            Route(p + "/tenants/{t}/scim", self.endpoint(self.connect_scim, status=201), methods=["POST"]),
            Route(p + "/tenants/{t}/scim", self.endpoint(self.disconnect_scim, status=204), methods=["DELETE"]),
            Route(p + "/tenants/{t}/scim/token", self.endpoint(self.rotate_token), methods=["POST"]),
            Route(p + "/tenants/{t}/scim/config", self.endpoint(self.get_config), methods=["GET"]),
            Route(p + "/tenants/{t}/scim/config", self.endpoint(self.put_config, wakes=True), methods=["PUT"]),
            Route(p + "/tenants/{t}/scim/config/preview", self.endpoint(self.preview_config), methods=["POST"]),
            Route(p + "/tenants/{t}/groups", self.endpoint(self.groups), methods=["GET"]),
            Route(p + "/tenants/{t}/users", self.endpoint(self.users), methods=["GET"]),
            Route(p + "/tenants/{t}/users/{id}", self.endpoint(self.user), methods=["GET"]),
            Route(p + "/tenants/{t}/users/{id}", self.endpoint(self.remove_user, status=204, wakes=True), methods=["DELETE"]),
            Route(p + "/tenants/{t}/licenses", self.endpoint(self.licenses), methods=["GET"]),
            Route(p + "/tenants/{t}/purchases", self.endpoint(self.purchases), methods=["GET"]),
            Route(p + "/tenants/{t}/purchases/{id}/approve", self.endpoint(self.approve_purchase, sends=True, wakes=True),
                  methods=["POST"]),
            Route(p + "/tenants/{t}/purchases/{id}/reject", self.endpoint(self.reject_purchase, wakes=True),
                  methods=["POST"]),
            Route(p + "/tenants/{t}/purchases/{id}/cancel", self.endpoint(self.cancel_purchase, wakes=True),
                  methods=["POST"]),
            Route(p + "/tenants/{t}/billing", self.endpoint(self.get_billing), methods=["GET"]),
            Route(p + "/tenants/{t}/billing", self.endpoint(self.link_billing, status=202, wakes=True),
                  methods=["PUT"]),
            Route(p + "/tenants/{t}/sync", self.endpoint(self.sync), methods=["GET"]),
            Route(p + "/tenants/{t}/audit", self.endpoint(self.audit), methods=["GET"]),
            Route(p + "/tenants/{t}/holds", self.endpoint(self.holds), methods=["GET"]),
            Route(p + "/tenants/{t}/holds/confirm", self.endpoint(self.confirm_holds, wakes=True), methods=["POST"]),
            Route(p + "/tenants/{t}/holds/revert", self.endpoint(self.revert_holds), methods=["POST"]),
        ]

    def endpoint(
        self, handler: AdminHandler, *, status: int = 200, wakes: bool = False, sends: bool = False
    ) -> Callable[[Request], Any]:
        async def serve(request: Request) -> Response:
            if not same_secret(bearer(request.headers.get("authorization")), self.settings.admin_token):
                raise AdminError(401, "unauthorized", "A valid admin bearer token is required.")
            if any("\x00" in value for value in request.path_params.values()):
                # No id holds U+0000, and PostgreSQL refuses it in a query parameter.
                raise AdminError(404, "not_found", "Not found.")
            body = None
            if request.method in ("POST", "PUT"):
                raw = await request.body()
                if len(raw) > MAX_ADMIN_BODY:
                    raise AdminError(413, "too_large", "The request body is too large.")
                try:
                    body = orjson.loads(raw) if raw.strip() else {}
                except orjson.JSONDecodeError:
                    raise AdminError(400, "invalid_json", "The request body is not valid JSON.") from None
                if not isinstance(body, dict):
                    raise AdminError(400, "invalid_body", "The request body must be a JSON object.")
                if _holds_nul(body):
                    raise AdminError(400, "invalid_body", "Strings in the request body may not contain U+0000.")
            path = dict(request.path_params)
            # Query parameters ride along under a key no route uses as a path parameter.
            path["?"] = dict(request.query_params)
            try:
                result, tenant_id = await run_in_threadpool(self.run, handler, path, body)
            except TenantError:
                raise
            except Exception as exc:
                if database_unavailable(exc):
                    raise  # a 503 with Retry-After, answered by the app's one handler for it
                # Answered here: Starlette's outer handler would reset the connection.
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return JSONResponse({"error": "internal", "detail": "Internal server error."}, status_code=500)
            if wakes and tenant_id:
                await run_in_threadpool(self.wake, tenant_id)
            if sends and self.send_purchase is not None and isinstance(result, dict) and result.get("status") == "pending":
                await run_in_threadpool(self.send_purchase, result["id"])
            if isinstance(result, Response):
                return result
            if status == 204:
                return Response(status_code=204)
            return JSONResponse(result, status_code=status)

        return serve

    def run(self, handler: AdminHandler, path: dict[str, Any], body: Any) -> tuple[Any, str | None]:
        with session_scope(self.engine) as session:
            tenant = None
            if "t" in path:
                tenant = tenants.get_tenant(session, path["t"])
            result = handler(session, tenant, path, body)
        return result, (tenant.id if tenant else result.get("tenant_id") if isinstance(result, dict) else None)

    # ------------------------------------------------------------ tenants

    def list_tenants(self, session: Session, _tenant: None, _path: dict, _body: None) -> list[dict[str, Any]]:
        return service.list_tenants(session)

    def create_tenant(self, session: Session, _tenant: None, _path: dict, body: dict) -> dict[str, Any]:
        tenant = service.create_tenant(
            session, service.API_ACTOR, body.get("name"), body.get("stripe_customer_id"), body.get("stripe_subscription_id")
        )
        return {"tenant_id": tenant.id}

    def link_billing(self, session: Session, tenant: Tenant, _path: dict, body: dict) -> dict[str, Any]:
        """Link (or re-link) a Stripe customer and subscription: 202, the worker checks them against Stripe."""
        extra = sorted(set(body) - {"stripe_customer_id", "stripe_subscription_id"})
        if extra:
            raise AdminError(400, "invalid_body", f"Unknown field(s): {', '.join(extra)}.")
        return service.link_billing(
            session, service.API_ACTOR, tenant, body.get("stripe_customer_id"), body.get("stripe_subscription_id")
        )

    def get_scim(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        state = service.scim_state(self.settings, tenant)
        return {key: state[key] for key in ("enabled", "provider", "tenant_url", "last_request_at")}

    def connect_scim(self, session: Session, tenant: Tenant, _path: dict, body: dict) -> dict[str, Any]:
        credentials = service.connect_scim(session, self.settings, service.API_ACTOR, tenant, body.get("provider"))
        return {"tenant_url": credentials.tenant_url, "token": credentials.token}

    def rotate_token(self, session: Session, tenant: Tenant, _path: dict, _body: dict) -> dict[str, Any]:
        credentials = service.rotate_token(session, self.settings, service.API_ACTOR, tenant)
        return {"tenant_url": credentials.tenant_url, "token": credentials.token}

    def disconnect_scim(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> None:
        service.disconnect_scim(session, service.API_ACTOR, tenant)

    # ------------------------------------------------------------ mapping

    def get_config(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        return service.get_config(session, tenant, self.settings)

    def put_config(self, session: Session, tenant: Tenant, _path: dict, body: dict) -> dict[str, Any]:
        return service.save_config(session, service.API_ACTOR, tenant, body, self.settings)

    def preview_config(self, session: Session, tenant: Tenant, _path: dict, body: dict) -> dict[str, Any]:
        return service.preview_json(*service.preview_config(session, self.settings, tenant, body))

    def groups(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> list[dict[str, Any]]:
        return service.group_rows(session, tenant)

    # -------------------------------------------------------------- users

    def users(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> Response:
        # Every user, serialised a page at a time: what the list holds at once is one page
        # of rows and the JSON, not the whole tenant as objects (views.USER_PAGE_ROWS).
        pages = [orjson.dumps(page)[1:-1] for page in views.user_pages(session, tenant.id) if page]
        return Response(b"[" + b",".join(pages) + b"]", media_type="application/json")

    def user(self, session: Session, tenant: Tenant, path: dict, _body: None) -> dict[str, Any]:
        return service.user_detail(session, self.settings, tenant, path["id"])

    def remove_user(self, session: Session, tenant: Tenant, path: dict, _body: None) -> None:
        service.remove_user(session, service.API_ACTOR, tenant, path["id"])

    def licenses(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        return views.licenses(session, tenant)

    def purchases(self, session: Session, tenant: Tenant, path: dict, _body: None) -> Any:
        query = path["?"]
        wanted = query.get("format", "json")
        if wanted not in ("json", "csv"):
            raise AdminError(400, "invalid_query", "'format' must be json or csv.")
        since = None
        if query.get("since"):
            try:
                since = service.parse_since(query["since"])
            except ValueError as error:
                raise AdminError(400, "invalid_query", str(error)) from None
        if wanted == "json":
            return views.purchases(session, tenant.id, since)
        body = "".join(ledger.csv_lines(tenant, ledger.ledger_rows(session, tenant.id, since)))
        return Response(
            body,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="sally-purchases-{tenant.id}.csv"'},
        )

    def approve_purchase(self, session: Session, tenant: Tenant, path: dict, _body: dict) -> dict[str, Any]:
        return service.decide_purchase(session, service.API_ACTOR, tenant, path["id"], "approve")

    def reject_purchase(self, session: Session, tenant: Tenant, path: dict, _body: dict) -> dict[str, Any]:
        return service.decide_purchase(session, service.API_ACTOR, tenant, path["id"], "reject")

    def cancel_purchase(self, session: Session, tenant: Tenant, path: dict, _body: dict) -> dict[str, Any]:
        return service.decide_purchase(session, service.API_ACTOR, tenant, path["id"], "cancel")

    def get_billing(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        return service.billing_state(tenant)

    def sync(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        return views.sync_state(session, tenant)

    def audit(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> list[dict[str, Any]]:
        return service.audit_rows(session, tenant)

    # ---------------------------------------------- mass-deprovision holds

    def holds(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        return deprovision.holds(session, tenant.id)

    def confirm_holds(self, session: Session, tenant: Tenant, _path: dict, _body: dict) -> dict[str, Any]:
        # Under the tenant's lock: a reconcile in flight finishes (or starts) on either side of the decision.
        lock_tenant(session, tenant.id)
        return {"confirmed": len(deprovision.confirm(session, tenant.id, utcnow()))}

    def revert_holds(self, session: Session, tenant: Tenant, _path: dict, _body: dict) -> dict[str, Any]:
        lock_tenant(session, tenant.id)
        return {"reverted": len(deprovision.revert(session, tenant.id, utcnow()))}


def _holds_nul(value: Any) -> bool:
    """Whether any string (or key) in a JSON value holds U+0000, which PostgreSQL text cannot store."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
