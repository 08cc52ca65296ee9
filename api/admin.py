"""The admin API under /admin/api: tenants, SCIM connection, mapping, users, seats, sync."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api import tenants, views
from api.scim.render import iso
from api.tenants import TenantError
from api.tokens import bearer, same_secret
from billing import guard, ledger
from billing.locks import lock_tenant
from models.db import session_scope
from models.directory import groups, users
from models.directory.events import record_event
from models.directory.members import member_counts
from models.settings import TIERS, Settings
from models.tables import GroupMapping, Tenant, utcnow

log = logging.getLogger(__name__)

MAX_ADMIN_BODY = 1024 * 1024
SLOTS = ("user", "admin", *TIERS)

AdminHandler = Callable[..., Any]


class AdminError(TenantError):
    """An admin API error: {"error": code, "detail": text}."""


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
            Route(p + "/tenants", self.endpoint(self.create_tenant, status=201, wakes=True), methods=["POST"]),
            Route(p + "/tenants/{t}/scim", self.endpoint(self.get_scim), methods=["GET"]),
            Route(p + "/tenants/{t}/scim", self.endpoint(self.connect_scim, status=201), methods=["POST"]),
            Route(p + "/tenants/{t}/scim", self.endpoint(self.disconnect_scim, status=204), methods=["DELETE"]),
            Route(p + "/tenants/{t}/scim/token", self.endpoint(self.rotate_token), methods=["POST"]),
            Route(p + "/tenants/{t}/scim/config", self.endpoint(self.get_config), methods=["GET"]),
            Route(p + "/tenants/{t}/scim/config", self.endpoint(self.put_config, wakes=True), methods=["PUT"]),
            Route(p + "/tenants/{t}/groups", self.endpoint(self.groups), methods=["GET"]),
            Route(p + "/tenants/{t}/users", self.endpoint(self.users), methods=["GET"]),
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
            except Exception:
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
        if tenant is not None:
            return result, tenant.id
        return result, (result.get("tenant_id") if isinstance(result, dict) else None)

    # ------------------------------------------------------------ tenants

    def create_tenant(self, session: Session, _tenant: None, _path: dict, body: dict) -> dict[str, Any]:
        tenant = tenants.create_tenant(
            session, body.get("name"), body.get("stripe_customer_id"), body.get("stripe_subscription_id")
        )
        return {"tenant_id": tenant.id}

    def get_scim(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        return {
            "enabled": tenant.scim_enabled,
            "provider": tenant.provider,
            "tenant_url": tenants.tenant_url(self.settings.public_base_url, tenant.id),
            "last_request_at": iso(tenant.last_request_at) if tenant.last_request_at else None,
        }

    def connect_scim(self, session: Session, tenant: Tenant, _path: dict, body: dict) -> dict[str, Any]:
        credentials = tenants.connect_scim(session, tenant, body.get("provider"), self.settings.public_base_url)
        return {"tenant_url": credentials.tenant_url, "token": credentials.token}

    def rotate_token(self, session: Session, tenant: Tenant, _path: dict, _body: dict) -> dict[str, Any]:
        credentials = tenants.rotate_token(session, tenant, self.settings.public_base_url)
        return {"tenant_url": credentials.tenant_url, "token": credentials.token}

    def disconnect_scim(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> None:
        tenants.disconnect_scim(session, tenant)

    # ------------------------------------------------------------ mapping

    def get_config(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        slots: dict[str, list[str]] = {slot: [] for slot in SLOTS}
        for group_id, slot in session.execute(
            select(GroupMapping.group_id, GroupMapping.slot)
            .where(GroupMapping.tenant_id == tenant.id)
            .order_by(GroupMapping.slot, GroupMapping.group_id)
        ):
            slots[slot].append(group_id)
        return {
            "user_groups": slots["user"],
            "admin_groups": slots["admin"],
            "license_groups": {tier: slots[tier] for tier in TIERS},
            "auto_invite": tenant.auto_invite,
            "seat_cap": tenant.seat_cap,
            "spend_guard": {
                "enabled": tenant.guard_enabled,
                "min_seats": tenant.guard_min_seats,
                "percent": tenant.guard_percent,
                "first_purchase_seats": tenant.guard_first_purchase,
            },
        }

    def put_config(self, session: Session, tenant: Tenant, path: dict, body: dict) -> dict[str, Any]:
        wanted = _parse_config(body)
        group_ids = {gid for ids in wanted["slots"].values() for gid in ids}
        known = groups.known_group_ids(session, tenant.id, sorted(group_ids))
        unknown = sorted(group_ids - known)
        if unknown:
            raise AdminError(400, "unknown_group", f"Unknown group id(s) for this tenant: {', '.join(unknown[:10])}.")
        session.execute(delete(GroupMapping).where(GroupMapping.tenant_id == tenant.id))
        rows = [
            {"tenant_id": tenant.id, "group_id": gid, "slot": slot}
            for slot, ids in wanted["slots"].items()
            for gid in sorted(set(ids))
        ]
        if rows:
            session.execute(insert(GroupMapping), rows)
        tenant.auto_invite = wanted["auto_invite"]
        tenant.seat_cap = wanted["seat_cap"]
        # Replaced like the rest of the config: what is left out takes the default (the guard on).
        spend_guard = {**GUARD_DEFAULTS, **(wanted["spend_guard"] or {})}
        tenant.guard_enabled = spend_guard["enabled"]
        tenant.guard_min_seats = spend_guard["min_seats"]
        tenant.guard_percent = spend_guard["percent"]
        tenant.guard_first_purchase = spend_guard["first_purchase_seats"]
        session.add(tenant)
        # A mapping change re-evaluates everyone it touches: the whole tenant.
        record_event(session, tenant.id, "config_changed", None)
        session.flush()
        return self.get_config(session, tenant, path, None)

    def groups(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> list[dict[str, Any]]:
        rows = groups.groups_by_name(session, tenant.id)
        counts = member_counts(session, [g.id for g in rows])
        return [
            {"id": g.id, "displayName": g.display_name, "externalId": g.external_id, "members": counts[g.id]}
            for g in rows
        ]

    # -------------------------------------------------------------- users

    def users(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> list[dict[str, Any]]:
        return views.user_rows(session, tenant.id)

    def remove_user(self, session: Session, tenant: Tenant, path: dict, _body: None) -> None:
        user = users.get_user_any(session, tenant.id, path["id"])
        if user is None:
            raise AdminError(404, "not_found", f"User '{path['id']}' not found.")
        if user.deleted_at is None:
            users.delete_user(session, user, kind="user_removed")

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
                since = parse_since(query["since"])
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
        return self._decide(session, tenant, path["id"], lambda now: guard.approve(session, tenant, path["id"], now))

    def reject_purchase(self, session: Session, tenant: Tenant, path: dict, _body: dict) -> dict[str, Any]:
        return self._decide(
            session, tenant, path["id"], lambda now: guard.stop(session, tenant, path["id"], now, rejected=True)
        )

    def cancel_purchase(self, session: Session, tenant: Tenant, path: dict, _body: dict) -> dict[str, Any]:
        return self._decide(
            session, tenant, path["id"], lambda now: guard.stop(session, tenant, path["id"], now, rejected=False)
        )

    def _decide(self, session: Session, tenant: Tenant, purchase_id: str, decide: Callable[[Any], Any]) -> dict[str, Any]:
        # Under the tenant's lock: a purchase job freezing this purchase meanwhile waits for us.
        lock_tenant(session, tenant.id)
        try:
            purchase = decide(utcnow())
        except LookupError:
            raise AdminError(404, "not_found", f"Purchase '{purchase_id}' not found.") from None
        except guard.PurchaseStateError as error:
            raise AdminError(409, error.code, error.detail) from None
        # The users' reasons follow the decision at the next reconcile.
        record_event(session, tenant.id, "purchase_decided", [])
        return views.purchase_row(purchase)

    # ------------------------------------------------------------ billing

    def get_billing(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        return views.billing(tenant)

    def link_billing(self, session: Session, tenant: Tenant, path: dict, body: dict) -> dict[str, Any]:
        """Link (or re-link) a Stripe customer and subscription; the worker checks them against Stripe."""
        extra = sorted(set(body) - {"stripe_customer_id", "stripe_subscription_id"})
        if extra:
            raise AdminError(400, "invalid_body", f"Unknown field(s): {', '.join(extra)}.")
        tenants.link_billing(session, tenant, body.get("stripe_customer_id"), body.get("stripe_subscription_id"))
        return views.billing(tenant)

    def sync(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        return views.sync_state(session, tenant)


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


def _id_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdminError(400, "invalid_body", f"'{where}' must be a list of group ids.")
    return value


def parse_since(raw: str) -> datetime:
    """A date (2026-12-01) or an ISO 8601 time; naive means UTC."""
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"'since' must be a date (YYYY-MM-DD) or an ISO 8601 time, got {raw[:40]!r}.") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


_DEFAULT = guard.GuardPolicy()
GUARD_DEFAULTS = {"enabled": _DEFAULT.enabled, "min_seats": _DEFAULT.min_seats, "percent": _DEFAULT.percent,
                  "first_purchase_seats": _DEFAULT.first_purchase}
GUARD_FIELDS = {"enabled": bool, "min_seats": int, "percent": int, "first_purchase_seats": int}
# Ceilings that keep the numbers meaningful (and inside a 32-bit column).
GUARD_MAXIMUM = {"min_seats": 1_000_000, "percent": 1000, "first_purchase_seats": 1_000_000}


def _parse_guard(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise AdminError(400, "invalid_body", "'spend_guard' must be an object.")
    extra = sorted(set(value) - set(GUARD_FIELDS))
    if extra:
        raise AdminError(400, "invalid_body", f"Unknown spend_guard field(s): {', '.join(extra)}.")
    for name, kind in GUARD_FIELDS.items():
        if name not in value:
            continue
        item = value[name]
        if kind is bool and not isinstance(item, bool):
            raise AdminError(400, "invalid_body", f"spend_guard.{name} must be true or false.")
        if kind is int and (not isinstance(item, int) or isinstance(item, bool) or not 0 <= item <= GUARD_MAXIMUM[name]):
            raise AdminError(
                400, "invalid_body", f"spend_guard.{name} must be a whole number from 0 to {GUARD_MAXIMUM[name]}."
            )
    return value


def _parse_config(body: dict[str, Any]) -> dict[str, Any]:
    known = {"user_groups", "admin_groups", "license_groups", "auto_invite", "seat_cap", "spend_guard"}
    extra = sorted(set(body) - known)
    if extra:
        raise AdminError(400, "invalid_body", f"Unknown field(s): {', '.join(extra)}.")
    slots = {
        "user": _id_list(body.get("user_groups"), "user_groups"),
        "admin": _id_list(body.get("admin_groups"), "admin_groups"),
    }
    license_groups = body.get("license_groups") or {}
    if not isinstance(license_groups, dict):
        raise AdminError(400, "invalid_body", "'license_groups' must be an object of tier → group ids.")
    for tier in license_groups:
        if tier not in TIERS:
            raise AdminError(400, "invalid_body", f"Unknown license tier '{tier}'; tiers are {', '.join(TIERS)}.")
    for tier in TIERS:
        slots[tier] = _id_list(license_groups.get(tier), f"license_groups.{tier}")
    auto_invite = body.get("auto_invite", False)
    if not isinstance(auto_invite, bool):
        raise AdminError(400, "invalid_body", "'auto_invite' must be true or false.")
    seat_cap = body.get("seat_cap")
    if seat_cap is not None:
        if not isinstance(seat_cap, dict):
            raise AdminError(400, "invalid_body", "'seat_cap' must be an object of tier → seats.")
        for tier, cap in seat_cap.items():
            if tier not in TIERS:
                raise AdminError(400, "invalid_body", f"Unknown license tier '{tier}' in seat_cap.")
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
                raise AdminError(400, "invalid_body", f"seat_cap.{tier} must be a whole number ≥ 0.")
        seat_cap = dict(seat_cap) or None
    return {"slots": slots, "auto_invite": auto_invite, "seat_cap": seat_cap, "spend_guard": _parse_guard(body.get("spend_guard"))}

