"""The admin API under /admin/api: tenants, SCIM connection, mapping, users, seats, sync."""

from __future__ import annotations

import logging
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
from billing.locks import lock_tenant
from models.db import session_scope
from models.directory import groups, users
from models.directory.events import record_event
from models.directory.members import member_counts
from models.settings import TIERS, Settings
from models.tables import GroupMapping, Tenant, utcnow
from workers import deprovision

log = logging.getLogger(__name__)

MAX_ADMIN_BODY = 1024 * 1024
# Per-tenant limits in the SCIM config: name → (lowest, highest) value.
LIMITS = {"invite_daily_cap": (1, 10_000_000), "hold_min_users": (0, 10_000_000), "hold_percent": (0, 100)}
SLOTS = ("user", "admin", *TIERS)

AdminHandler = Callable[..., Any]


class AdminError(TenantError):
    """An admin API error: {"error": code, "detail": text}."""


def admin_error_response(exc: TenantError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)


class AdminApi:
    """JSON in and out; every change that can alter access appends a sync event in its transaction."""

    def __init__(self, settings: Settings, engine: Engine, wake: Callable[[str], Any]) -> None:
        self.settings = settings
        self.engine = engine
        self.wake = wake

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
            Route(p + "/tenants/{t}/sync", self.endpoint(self.sync), methods=["GET"]),
            Route(p + "/tenants/{t}/holds", self.endpoint(self.holds), methods=["GET"]),
            Route(p + "/tenants/{t}/holds/confirm", self.endpoint(self.confirm_holds, wakes=True), methods=["POST"]),
            Route(p + "/tenants/{t}/holds/revert", self.endpoint(self.revert_holds), methods=["POST"]),
        ]

    def endpoint(self, handler: AdminHandler, *, status: int = 200, wakes: bool = False) -> Callable[[Request], Any]:
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
            try:
                result, tenant_id = await run_in_threadpool(self.run, handler, request.path_params, body)
            except TenantError:
                raise
            except Exception:
                # Answered here: Starlette's outer handler would reset the connection.
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return JSONResponse({"error": "internal", "detail": "Internal server error."}, status_code=500)
            if wakes and tenant_id:
                await run_in_threadpool(self.wake, tenant_id)
            if status == 204:
                return Response(status_code=204)
            return JSONResponse(result, status_code=status)

        return serve

    def run(self, handler: AdminHandler, path: dict[str, str], body: Any) -> tuple[Any, str | None]:
        with session_scope(self.engine) as session:
            tenant = None
            if "t" in path:
                tenant = tenants.get_tenant(session, path["t"])
            result = handler(session, tenant, path, body)
        return result, (tenant.id if tenant else (result or {}).get("tenant_id"))

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
            .where(GroupMapping.tenant_id == tenant.id, GroupMapping.deleted_at.is_(None))
            .order_by(GroupMapping.slot, GroupMapping.group_id)
        ):
            slots[slot].append(group_id)
        return {
            "user_groups": slots["user"],
            "admin_groups": slots["admin"],
            "license_groups": {tier: slots[tier] for tier in TIERS},
            "auto_invite": tenant.auto_invite,
            "seat_cap": tenant.seat_cap,
            # Per-tenant limits; null = the deployment's default (INVITE_DAILY_CAP,
            # DEPROVISION_HOLD_MIN_USERS, DEPROVISION_HOLD_PERCENT), shown in `effective`.
            "invite_daily_cap": tenant.invite_daily_cap,
            "hold_min_users": tenant.hold_min_users,
            "hold_percent": tenant.hold_percent,
            "effective": {
                "invite_daily_cap": tenant.invite_daily_cap or self.settings.invite_daily_cap,
                "hold_min_users": _or(tenant.hold_min_users, self.settings.hold_min_users),
                "hold_percent": _or(tenant.hold_percent, self.settings.hold_percent),
            },
        }

    def put_config(self, session: Session, tenant: Tenant, path: dict, body: dict) -> dict[str, Any]:
        wanted = _parse_config(body)
        group_ids = {gid for ids in wanted["slots"].values() for gid in ids}
        known = groups.known_group_ids(session, tenant.id, sorted(group_ids))
        unknown = sorted(group_ids - known)
        if unknown:
            raise AdminError(400, "unknown_group", f"Unknown group id(s) for this tenant: {', '.join(unknown[:10])}.")
        # Tombstones of groups the IdP deleted stay: re-creating the group restores its slot.
        session.execute(
            delete(GroupMapping).where(GroupMapping.tenant_id == tenant.id, GroupMapping.deleted_at.is_(None))
        )
        rows = [
            {"tenant_id": tenant.id, "group_id": gid, "slot": slot}
            for slot, ids in wanted["slots"].items()
            for gid in sorted(set(ids))
        ]
        if rows:
            session.execute(insert(GroupMapping), rows)
        tenant.auto_invite = wanted["auto_invite"]
        tenant.seat_cap = wanted["seat_cap"]
        tenant.invite_daily_cap = wanted["invite_daily_cap"]
        tenant.hold_min_users = wanted["hold_min_users"]
        tenant.hold_percent = wanted["hold_percent"]
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

    def purchases(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> list[dict[str, Any]]:
        return views.purchases(session, tenant.id)

    def sync(self, session: Session, tenant: Tenant, _path: dict, _body: None) -> dict[str, Any]:
        return views.sync_state(session, tenant)

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


def _id_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdminError(400, "invalid_body", f"'{where}' must be a list of group ids.")
    return value


def _parse_config(body: dict[str, Any]) -> dict[str, Any]:
    known = {"user_groups", "admin_groups", "license_groups", "auto_invite", "seat_cap", *LIMITS, "effective"}
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
    limits = {name: _limit(body.get(name), name, low, high) for name, (low, high) in LIMITS.items()}
    return {"slots": slots, "auto_invite": auto_invite, "seat_cap": seat_cap, **limits}


def _limit(value: Any, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise AdminError(400, "invalid_body", f"'{name}' must be a whole number from {low} to {high}, or null.")
    return value


def _or(value: int | None, default: int) -> int:
    return default if value is None else value

