"""The ledger-only gateway: no billing is an implementation of the Gateway protocol, not a None."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from billing.gateway import LedgerGateway
from billing.stripe_gateway import PermanentBillingError, StripeGateway, SubscriptionState


def test_the_ledger_gateway_bills_no_tenant_even_one_linked_to_stripe():
    """Given a tenant with a subscription id, when no Stripe key is set, then its seats are not billed."""
    linked = SimpleNamespace(stripe_subscription_id="sub_1")
    assert LedgerGateway().bills(linked) is False


def test_the_stripe_gateway_bills_exactly_the_tenants_linked_to_a_subscription():
    gateway = StripeGateway("sk_test_x", {"team": "price_team"})
    assert gateway.bills(SimpleNamespace(stripe_subscription_id="sub_1")) is True
    assert gateway.bills(SimpleNamespace(stripe_subscription_id=None)) is False


@pytest.mark.parametrize(
    "call",
    [
        lambda g: g.read_subscription("sub_1"),
        lambda g: g.build_update(SubscriptionState({}, {}), {"team": 1}, {}),
        lambda g: g.apply_update("sub_1", {}, "key"),
    ],
)
def test_the_ledger_gateway_refuses_every_stripe_call_for_good(call):
    with pytest.raises(PermanentBillingError, match="STRIPE_API_KEY"):
        call(LedgerGateway())
