"""The billing gateway protocol, and the ledger-only gateway used when Stripe is not configured."""

from __future__ import annotations

from typing import Any, Protocol

from billing.stripe_gateway import Invoice, PermanentBillingError, SubscriptionState

LEDGER_ONLY = "Billing is not configured (no STRIPE_API_KEY): seats are recorded in the ledger only."


class Gateway(Protocol):
    """Where seats are bought: Stripe (StripeGateway) or nowhere (LedgerGateway)."""

    def bills(self, tenant: Any) -> bool:
        """Whether this tenant's seats are bought through the gateway (else recorded as not_billed)."""
        ...

    def read_subscription(self, subscription_id: str) -> SubscriptionState: ...
    def build_update(self, state: SubscriptionState, targets: dict[str, int], metadata: dict[str, str]) -> dict: ...
    def apply_update(self, subscription_id: str, params: dict, idempotency_key: str) -> Invoice | None: ...
    def find_invoice(self, subscription_id: str, purchase_id: str) -> Invoice | None: ...


class LedgerGateway:
    """No billing: every purchase settles as `not_billed` in the ledger, and nothing is ever charged."""

    def __repr__(self) -> str:
        return "LedgerGateway()"

    def bills(self, tenant: Any) -> bool:
        """Never: no tenant is billed without a Stripe key."""
        return False

    # Never reached through bills() == False; refused for good should a caller try.
    def read_subscription(self, subscription_id: str) -> SubscriptionState:
        """Refused: there is no subscription to read without Stripe."""
        raise PermanentBillingError(LEDGER_ONLY)

    def build_update(self, state: SubscriptionState, targets: dict[str, int], metadata: dict[str, str]) -> dict:
        """Refused: there is no subscription to update without Stripe."""
        raise PermanentBillingError(LEDGER_ONLY)

    def apply_update(self, subscription_id: str, params: dict, idempotency_key: str) -> Invoice | None:
        """Refused: nothing is charged without Stripe."""
        raise PermanentBillingError(LEDGER_ONLY)

    def find_invoice(self, subscription_id: str, purchase_id: str) -> Invoice | None:
        """Refused: there are no invoices without Stripe."""
        raise PermanentBillingError(LEDGER_ONLY)
