"""Tenant life cycle: create, connect SCIM (token shown once), rotate, disconnect."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from api.tokens import new_token, token_digest
from models.directory.events import record_event
from models.tables import Purchase, Tenant, utcnow

PROVIDERS = ("entra", "google", "okta", "onelogin", "pingone")


class TenantError(Exception):
    """A tenant operation that the tenant's state does not allow."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Credentials:
    tenant_url: str
    token: str


def tenant_url(public_base_url: str, tenant_id: str) -> str:
    return f"{public_base_url}/scim/v2/{tenant_id}"


def get_tenant(session: Session, tenant_id: str, *, lock: bool = False) -> Tenant:
    query = select(Tenant).where(Tenant.id == tenant_id)
    if lock:
        query = query.with_for_update()
    tenant = session.execute(query).scalar_one_or_none()
    if tenant is None:
        raise TenantError(404, "not_found", f"Tenant '{tenant_id}' not found.")
    return tenant


def create_tenant(
    session: Session, name: str, stripe_customer_id: str | None = None, stripe_subscription_id: str | None = None
) -> Tenant:
    if not isinstance(name, str) or not name.strip():
        raise TenantError(400, "invalid_body", "'name' is required and must be a non-empty string.")
    if len(name) > 255:
        raise TenantError(400, "invalid_body", "'name' is longer than 255 characters.")
    for label, value in (("stripe_customer_id", stripe_customer_id), ("stripe_subscription_id", stripe_subscription_id)):
        if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > 255):
            raise TenantError(400, "invalid_body", f"'{label}' must be a non-empty string.")
    if stripe_subscription_id:
        _subscription_free(session, stripe_subscription_id, None)
    tenant = Tenant(name=name.strip(), stripe_customer_id=stripe_customer_id, stripe_subscription_id=stripe_subscription_id)
    if stripe_subscription_id:
        tenant.billing_linked_at = tenant.created_at
        tenant.billing_status = "unverified"
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:
        # Another request linked the same subscription a moment ago.
        raise TenantError(409, "subscription_in_use", "Another tenant already uses this Stripe subscription.") from None
    if stripe_subscription_id:
        # Linking billing changes what the worker reads as seats bought.
        record_event(session, tenant.id, "billing_linked", None)
    return tenant


def _subscription_free(session: Session, subscription_id: str, tenant_id: str | None) -> None:
    """409 when another tenant already uses this Stripe subscription (the unique index is the backstop)."""
    other = session.execute(
        select(Tenant.id).where(Tenant.stripe_subscription_id == subscription_id, Tenant.id != (tenant_id or ""))
    ).scalar_one_or_none()
    if other is not None:
        raise TenantError(409, "subscription_in_use", "Another tenant already uses this Stripe subscription.")


def link_billing(session: Session, tenant: Tenant, customer: object, subscription: object) -> None:
    """Link an existing tenant to a Stripe customer and subscription; a worker checks them against Stripe.

    Stripe is never called on the request path (DESIGN.md): the answer is 202
    with status "unverified", and the worker sets "verified" (the subscription
    exists, belongs to the customer, is not canceled) or "invalid" with the reason.
    """
    for label, value in (("stripe_customer_id", customer), ("stripe_subscription_id", subscription)):
        if not isinstance(value, str) or not value.strip() or len(value) > 255 or value != value.strip():
            raise TenantError(400, "invalid_body", f"'{label}' is required and must be a Stripe id.")
    assert isinstance(customer, str) and isinstance(subscription, str)
    _subscription_free(session, subscription, tenant.id)
    open_purchase = session.execute(
        select(Purchase.id).where(Purchase.tenant_id == tenant.id, Purchase.status == "pending")
    ).first()
    if open_purchase is not None and subscription != tenant.stripe_subscription_id:
        raise TenantError(409, "purchase_in_flight", "A seat purchase is in flight; link billing once it has settled.")
    tenant.stripe_customer_id = customer
    tenant.stripe_subscription_id = subscription
    tenant.billing_linked_at = utcnow()
    tenant.billing_status = "unverified"
    tenant.billing_detail = None
    tenant.billing_blocked = None
    tenant.seats_lowered = None
    # Unread: the worker reads the subscription's quantities (and checks it) before anything is bought.
    tenant.seats_synced_at = None
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:
        raise TenantError(409, "subscription_in_use", "Another tenant already uses this Stripe subscription.") from None
    record_event(session, tenant.id, "billing_linked", None)


def connect_scim(session: Session, tenant: Tenant, provider: str, public_base_url: str) -> Credentials:
    """Set up (or reconnect) SCIM with a new token; the directory is kept."""
    if provider not in PROVIDERS:
        raise TenantError(400, "invalid_body", f"'provider' must be one of: {', '.join(PROVIDERS)}.")
    if tenant.scim_enabled:
        # A second set-up would silently cut off the connected IdP.
        raise TenantError(
            409, "scim_connected",
            "SCIM is already connected; rotate the token (POST …/scim/token) or disconnect it first.",
        )
    token = new_token()
    tenant.provider = provider
    tenant.scim_enabled = True
    tenant.token_hash = token_digest(token)
    tenant.token_created_at = utcnow()
    session.add(tenant)
    session.flush()
    return Credentials(tenant_url(public_base_url, tenant.id), token)


def rotate_token(session: Session, tenant: Tenant, public_base_url: str) -> Credentials:
    if not tenant.scim_enabled:
        raise TenantError(409, "scim_disabled", "SCIM is not connected for this tenant; connect it first.")
    token = new_token()
    tenant.token_hash = token_digest(token)
    tenant.token_created_at = utcnow()
    session.add(tenant)
    session.flush()
    return Credentials(tenant_url(public_base_url, tenant.id), token)


def disconnect_scim(session: Session, tenant: Tenant) -> None:
    """Revoke the token at once; provisioned users stay as they are."""
    tenant.scim_enabled = False
    tenant.token_hash = None
    session.add(tenant)
    session.flush()
