"""The one place that talks to Stripe: read seat quantities, buy seats, label the invoice.

Stripe's exceptions never leave this module: they become
``TransientBillingError`` (retry later with the same idempotency key) or
``PermanentBillingError`` (stop and show ``reason`` to the admin).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import stripe
import tenacity

from models.retries import retry_policy
from models.settings import TIERS

log = logging.getLogger(__name__)

T = TypeVar("T")


class BillingError(Exception):
    """A Stripe call failed; ``reason`` is safe to store and show (never holds the API key)."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code
        self.request_id = request_id


class TransientBillingError(BillingError):
    """Stripe could not be reached or asked us to come back: retry the same body with the same key."""


class PermanentBillingError(BillingError):
    """Stripe refused the request for good (declined card, invalid request, bad key)."""

    @property
    def is_auth(self) -> bool:
        """Our API key was refused (401/403): an operator's problem, not the tenant's."""
        return self.status in (401, 403)


@dataclass(frozen=True)
class SubscriptionState:
    """Seats bought per tier (every tier, 0 when absent), the item id of each tier present, and its owner."""

    quantities: dict[str, int]
    item_ids: dict[str, str]
    customer: str | None = None
    status: str | None = None
    # Per tier present: (price.unit_amount in minor units, price.currency), for the
    # admin page's preview; unit_amount is None for tiered or metered prices.
    prices: dict[str, tuple[int | None, str | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Invoice:
    """What finance reads of the invoice a purchase produced (amounts in the currency's minor unit)."""

    id: str
    status: str | None = None
    amount_due: int | None = None
    amount_paid: int | None = None
    currency: str | None = None
    paid_at: int | None = None  # Unix time, from status_transitions.paid_at

    @classmethod
    def from_stripe(cls, invoice: Mapping[str, Any]) -> "Invoice":
        """Read an invoice object (a dict as Stripe sends it, in an answer or a webhook)."""
        transitions = invoice.get("status_transitions") or {}
        return cls(
            id=invoice["id"],
            status=invoice.get("status"),
            amount_due=invoice.get("amount_due"),
            amount_paid=invoice.get("amount_paid"),
            currency=invoice.get("currency"),
            paid_at=transitions.get("paid_at"),
        )


class _ScrubKey(logging.Filter):
    """Takes our API key out of what the stripe library logs (it logs Stripe's error messages,
    and an "Invalid API Key provided: …" message can carry the key)."""

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.api_key and self.api_key in message:
            record.msg, record.args = message.replace(self.api_key, "[redacted]"), ()
        return True


def _scrub_library_logs(api_key: str) -> None:
    library = logging.getLogger("stripe")
    if not any(isinstance(f, _ScrubKey) and f.api_key == api_key for f in library.filters):
        library.addFilter(_ScrubKey(api_key))


class StripeGateway:
    """Reads and raises a tenant's per-tier seat quantities on its Stripe subscription."""

    def __init__(
        self,
        api_key: str,
        prices: Mapping[str, str],
        api_base: str | None = None,
        attempts: int = 4,
        wait_seconds: float = 0.5,
        timeout: float = 20.0,
    ) -> None:
        unknown = set(prices) - set(TIERS)
        if unknown:
            raise ValueError(f"prices for unknown tier(s): {sorted(unknown)}")
        if len(set(prices.values())) != len(prices):
            raise ValueError("each tier needs its own Stripe price")
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        if not 0 < timeout <= 20:
            raise ValueError("timeout must be in (0, 20] seconds")
        self._api_key = api_key
        _scrub_library_logs(api_key)
        self._prices = dict(prices)
        self._tier_of_price = {price: tier for tier, price in prices.items()}
        self._attempts = attempts
        self._wait_seconds = wait_seconds
        self.timeout = timeout
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            # tenacity is the one retry layer: the library's own retries would
            # multiply ours and hide the attempts from our logs.
            max_network_retries=0,
            # Connect and read timeouts of our own (the library waits 80 s): a Stripe that does
            # not answer frees the worker thread after this (issue 9: at most 20 s), then a transient error.
            http_client=stripe.RequestsClient(timeout=timeout),
        )

    def __repr__(self) -> str:
        # The default repr would be harmless today; this one can never grow the key.
        return f"StripeGateway(prices={self._prices!r})"

    def bills(self, tenant: Any) -> bool:
        """A tenant linked to a Stripe subscription has its seats bought there."""
        return bool(tenant.stripe_subscription_id)

    def read_subscription(self, subscription_id: str) -> SubscriptionState:
        """Current quantity and item id per tier; items with prices that are not ours are ignored."""
        subscription = self._call(lambda: self._client.v1.subscriptions.retrieve(subscription_id))
        quantities = dict.fromkeys(TIERS, 0)
        item_ids: dict[str, str] = {}
        prices: dict[str, tuple[int | None, str | None]] = {}
        for item in subscription.to_dict()["items"]["data"]:
            price = item["price"]
            price_id = price["id"] if isinstance(price, dict) else price
            tier = self._tier_of_price.get(price_id)
            if tier is None:
                continue
            # Stripe allows one item per price on a subscription, so a tier has at most one item.
            quantities[tier] = item.get("quantity") or 0
            item_ids[tier] = item["id"]
            if isinstance(price, dict):
                amount = price.get("unit_amount")
                currency = price.get("currency")
                prices[tier] = (
                    amount if isinstance(amount, int) and not isinstance(amount, bool) else None,
                    currency if isinstance(currency, str) else None,
                )
        raw = subscription.to_dict()
        customer = raw.get("customer")
        if isinstance(customer, dict):
            customer = customer.get("id")
        return SubscriptionState(
            quantities=quantities,
            item_ids=item_ids,
            customer=customer,
            status=raw.get("status"),
            prices=prices,
        )

    def build_update(
        self, state: SubscriptionState, targets: Mapping[str, int], metadata: Mapping[str, str]
    ) -> dict[str, Any]:
        """The exact POST /v1/subscriptions/{id} parameters that raise the quantities to ``targets``.

        Deterministic and JSON-serialisable: the caller stores it before the
        call and replays it verbatim (Stripe refuses a key reused with other
        parameters). Raises ValueError for a target below the current quantity.
        """
        unknown = set(targets) - set(TIERS)
        if unknown:
            raise ValueError(f"targets for unknown tier(s): {sorted(unknown)}")
        if not metadata:
            # The metadata is how apply_update recognises the invoice this update made.
            raise ValueError("metadata must identify the purchase")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError("Stripe metadata keys and values are strings")

        items: list[dict[str, Any]] = []
        for tier in TIERS:
            current = state.quantities.get(tier, 0)
            target = targets.get(tier, current)
            if isinstance(target, bool) or not isinstance(target, int):
                raise ValueError(f"target for {tier} must be an int, got {target!r}")
            if target < current:
                raise ValueError(f"refusing to lower {tier} from {current} to {target}: seats are never reduced")
            if tier in state.item_ids:
                # Absolute quantities, also for unchanged items: a late replay cannot add seats twice.
                items.append({"id": state.item_ids[tier], "quantity": target})
            elif target > 0:
                price = self._prices.get(tier)
                if price is None:
                    raise PermanentBillingError(f"no Stripe price is configured for the {tier} tier")
                items.append({"price": price, "quantity": target})
        return {
            "items": items,
            "proration_behavior": "always_invoice",
            # A declined card must fail the call (402), not leave an unpaid, incomplete update.
            "payment_behavior": "error_if_incomplete",
            "metadata": {key: metadata[key] for key in sorted(metadata)},
            "expand": ["latest_invoice"],
        }

    def apply_update(self, subscription_id: str, params: Mapping[str, Any], idempotency_key: str) -> Invoice | None:
        """Send the stored update with its key; return the invoice it produced (None if none) after labelling it."""
        body = copy.deepcopy(dict(params))
        subscription = self._call(
            lambda: self._client.v1.subscriptions.update(
                subscription_id, params=body, options={"idempotency_key": idempotency_key}
            )
        ).to_dict()

        metadata = dict(params.get("metadata") or {})
        invoice = self._invoice_of(subscription.get("latest_invoice"))
        if invoice is None or not _made_by(invoice, metadata):
            # latest_invoice is still an older invoice: this update raised nothing
            # (e.g. finance had already raised the quantity), so nothing was billed.
            return None

        label_options: stripe.RequestOptions = {"idempotency_key": f"{idempotency_key}:invoice"}
        try:
            self._call(
                lambda: self._client.v1.invoices.update(
                    invoice["id"], params={"metadata": metadata}, options=label_options
                )
            )
        except PermanentBillingError as error:
            # The seats are bought and paid; the subscription's metadata is already
            # on the invoice (parent.subscription_details). Failing the purchase now
            # would show paid seats as refused, so only report it.
            log.warning("seats bought but invoice %s not labelled: %s", invoice["id"], error.reason)
        return Invoice.from_stripe(invoice)

    def find_invoice(self, subscription_id: str, purchase_id: str) -> Invoice | None:
        """The subscription's latest invoice if a purchase's update made it (by its metadata), else None."""
        subscription = self._call(
            lambda: self._client.v1.subscriptions.retrieve(subscription_id, params={"expand": ["latest_invoice"]})
        ).to_dict()
        invoice = self._invoice_of(subscription.get("latest_invoice"))
        if invoice is None or not _made_by(invoice, {"sally_purchase_id": purchase_id}):
            return None
        return Invoice.from_stripe(invoice)

    def _invoice_of(self, latest_invoice: Any) -> dict[str, Any] | None:
        if latest_invoice is None:
            return None
        if isinstance(latest_invoice, dict):
            return latest_invoice
        # Stored bodies without expand[] give an id only: fetch the invoice to check it.
        return self._call(lambda: self._client.v1.invoices.retrieve(latest_invoice)).to_dict()

    def _call(self, request: Callable[[], T]) -> T:
        """Run one Stripe request, retrying transient faults, translating every Stripe error."""
        retrying = retry_policy(
            attempts=self._attempts,
            wait_seconds=self._wait_seconds,
            max_wait_seconds=self._wait_seconds * 16,
            retry=tenacity.retry_if_exception(_is_transient),
            before_sleep=self._log_retry,
        )
        try:
            return retrying(request)
        except stripe.StripeError as error:
            translated_cls = TransientBillingError if _is_transient(error) else PermanentBillingError
            translated = translated_cls(
                self._scrub(_describe(error)),
                status=error.http_status,
                code=error.code,
                request_id=error.request_id,
            )
        # Raised outside the except block: the Stripe exception (and any text in
        # it) stays out of the chain that logs and tracebacks print.
        raise translated

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        log.info(
            "Stripe call failed (attempt %d of %d), retrying with the same key: %s",
            retry_state.attempt_number,
            self._attempts,
            self._scrub(_describe(error)) if isinstance(error, stripe.StripeError) else error,
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]") if self._api_key else text


def _is_transient(error: BaseException) -> bool:
    """Faults where retrying the same request with the same key can succeed."""
    # A connection error may hide a request Stripe executed: only a retry with
    # the same key can tell, so it is never a permanent failure.
    if isinstance(error, (stripe.APIConnectionError, stripe.RateLimitError)):
        return True
    # APIError is what the library raises for 5xx, for 409 (another request with
    # this key still running, or a lock on the object) and for unreadable answers.
    return type(error) is stripe.APIError


def _describe(error: stripe.StripeError) -> str:
    """Stripe's code, decline code and message as one line for the admin."""
    details = getattr(error, "error", None)
    decline_code = getattr(details, "decline_code", None) if details is not None else None
    codes = "/".join(part for part in (error.code, decline_code) if part)
    if isinstance(error, stripe.IdempotencyError):
        codes = codes or "idempotency_error"
    status = f"HTTP {error.http_status}" if error.http_status else "no HTTP answer"
    # One line: the library wraps connection errors over several lines.
    message = " ".join((error.user_message or type(error).__name__).split())
    return f"Stripe {type(error).__name__} ({status}{', ' + codes if codes else ''}): {message}"


def _made_by(invoice: Mapping[str, Any], metadata: Mapping[str, str]) -> bool:
    """Whether Stripe created this invoice from the update that set ``metadata``."""
    parent = invoice.get("parent") or {}
    snapshot = (parent.get("subscription_details") or {}).get("metadata") or {}
    return all(snapshot.get(key) == value for key, value in metadata.items())
