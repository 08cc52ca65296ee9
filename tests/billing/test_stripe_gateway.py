"""The Stripe gateway, driven through the real ``stripe`` library against a local fake Stripe.

DESIGN.md "The purchase protocol" and "Retries": a stored body replayed with
its idempotency key buys exactly once; transient faults are retried with the
same key; refusals become a permanent error with a readable reason.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from billing.stripe_gateway import (
    PermanentBillingError,
    StripeGateway,
    SubscriptionState,
    TransientBillingError,
)
from tests.fakes.stripe_server import FakeStripe, parse_form

PRICES = {"starter": "price_starter", "team": "price_team", "enterprise": "price_enterprise"}
UNIT_AMOUNTS = {"price_starter": 800, "price_team": 1500, "price_enterprise": 4000}
METADATA = {"tenant_id": "t_42", "purchase_id": "p_7", "trigger": "scim_sync"}


@pytest.fixture
def fake():
    with FakeStripe(unit_amounts=UNIT_AMOUNTS) as server:
        server.add_subscription(
            "sub_1",
            customer="cus_1",
            items={"price_starter": 3, "price_enterprise": 1, "price_support_addon": 1},
        )
        yield server


@pytest.fixture
def gateway(fake):
    return StripeGateway(fake.api_key, PRICES, api_base=fake.url, attempts=4, wait_seconds=0.01)


def _purchase(gateway: StripeGateway, targets: dict[str, int], metadata: dict[str, str] = METADATA) -> dict:
    """Plan like the worker does: read, build, and store the body as JSON."""
    state = gateway.read_subscription("sub_1")
    return json.loads(json.dumps(gateway.build_update(state, targets, metadata)))


# -- reading ------------------------------------------------------------------


def test_read_subscription_reports_every_tier(gateway, fake):
    """Given a subscription with starter and enterprise items and a foreign add-on,
    When it is read, Then each tier has its quantity (0 when absent) and only our items count,
    with the customer it belongs to and its status (what linking billing checks),
    and each item's price (unit_amount in minor units, currency) for the admin's preview.
    """
    state = gateway.read_subscription("sub_1")

    items = {item["price"]["id"]: item["id"] for item in fake.subscription("sub_1")["items"]["data"]}
    assert state == SubscriptionState(
        quantities={"starter": 3, "team": 0, "enterprise": 1},
        item_ids={"starter": items["price_starter"], "enterprise": items["price_enterprise"]},
        customer="cus_1",
        status="active",
        prices={
            "starter": (UNIT_AMOUNTS["price_starter"], "usd"),
            "enterprise": (UNIT_AMOUNTS["price_enterprise"], "usd"),
        },
    )


def test_reading_an_unknown_subscription_is_permanent(gateway):
    """Given a subscription id Stripe does not know, When it is read,
    Then the error is permanent and says which object is missing.
    """
    with pytest.raises(PermanentBillingError) as caught:
        gateway.read_subscription("sub_missing")

    assert "resource_missing" in caught.value.reason
    assert "sub_missing" in caught.value.reason
    assert caught.value.status == 404


def test_a_read_is_retried_after_a_server_error(gateway, fake):
    """Given Stripe fails a GET once with a 503, When the subscription is read, Then the retry answers."""
    fake.fail_next(1, status=503)

    state = gateway.read_subscription("sub_1")

    assert state.quantities["starter"] == 3
    assert [call.method for call in fake.calls] == ["GET", "GET"]


# -- building the body ----------------------------------------------------------


def test_build_update_raises_existing_items_and_adds_missing_ones(gateway):
    """Given starter and enterprise items and no team item,
    When targets raise starter and ask for team seats,
    Then existing items are set by id, team is added by price, all with absolute quantities.
    """
    state = gateway.read_subscription("sub_1")

    params = gateway.build_update(state, {"starter": 5, "team": 2, "enterprise": 1}, METADATA)

    assert params == {
        "items": [
            {"id": state.item_ids["starter"], "quantity": 5},
            {"price": "price_team", "quantity": 2},
            {"id": state.item_ids["enterprise"], "quantity": 1},
        ],
        "proration_behavior": "always_invoice",
        "payment_behavior": "error_if_incomplete",
        "metadata": {"purchase_id": "p_7", "tenant_id": "t_42", "trigger": "scim_sync"},
        "expand": ["latest_invoice"],
    }


def test_build_update_is_deterministic_and_survives_json(gateway):
    """Given the same state, targets and metadata in another order,
    When the body is built twice, Then both serialise to the same JSON text (safe to store and replay).
    """
    state = gateway.read_subscription("sub_1")
    first = gateway.build_update(state, {"starter": 4, "team": 1, "enterprise": 1}, METADATA)
    second = gateway.build_update(
        state, {"enterprise": 1, "team": 1, "starter": 4}, dict(reversed(list(METADATA.items())))
    )

    assert json.dumps(first) == json.dumps(second)
    assert json.loads(json.dumps(first)) == first


def test_build_update_leaves_out_a_tier_with_no_item_and_no_seats(gateway):
    """Given no team item and a team target of 0, Then no team item is created."""
    state = gateway.read_subscription("sub_1")

    params = gateway.build_update(state, {"starter": 4, "team": 0, "enterprise": 1}, METADATA)

    assert all(item.get("price") != "price_team" for item in params["items"])
    assert len(params["items"]) == 2


def test_build_update_never_lowers_a_quantity(gateway, fake):
    """Given 3 starter seats bought (perhaps set by finance),
    When a target of 2 is asked for, Then the body is refused and nothing reaches Stripe.
    """
    state = gateway.read_subscription("sub_1")

    with pytest.raises(ValueError, match="never reduced"):
        gateway.build_update(state, {"starter": 2, "team": 0, "enterprise": 1}, METADATA)
    assert fake.posts() == []


def test_build_update_needs_metadata_that_names_the_purchase(gateway):
    """Given no metadata, Then the body is refused: finance and invoice matching rely on it."""
    state = gateway.read_subscription("sub_1")

    with pytest.raises(ValueError):
        gateway.build_update(state, {"starter": 4}, {})


def test_build_update_without_a_price_for_a_new_tier_is_permanent(fake):
    """Given no price configured for team, When team seats are needed,
    Then the purchase fails permanently with a reason an admin can act on.
    """
    gateway = StripeGateway(fake.api_key, {"starter": "price_starter"}, api_base=fake.url, wait_seconds=0.01)
    state = gateway.read_subscription("sub_1")

    with pytest.raises(PermanentBillingError, match="team"):
        gateway.build_update(state, {"team": 1}, METADATA)


# -- buying ---------------------------------------------------------------------


def test_apply_update_buys_seats_and_returns_the_invoice(gateway, fake):
    """Given 3 starter seats and none of team,
    When a stored body raising starter to 5 and team to 2 is applied,
    Then Stripe holds the new quantities, bills them at once on one paid invoice,
    and the purchase metadata is on the subscription and on the invoice itself.
    """
    params = _purchase(gateway, {"starter": 5, "team": 2, "enterprise": 1})

    invoice = gateway.apply_update("sub_1", params, "purchase-p_7")
    invoice_id = invoice.id

    assert (invoice.status, invoice.amount_due, invoice.amount_paid, invoice.currency) == (
        "paid", 2 * 800 + 2 * 1500, 2 * 800 + 2 * 1500, "usd")
    assert invoice.paid_at == fake.invoices[invoice_id]["status_transitions"]["paid_at"]
    assert fake.quantities("sub_1") == {
        "price_starter": 5,
        "price_enterprise": 1,
        "price_support_addon": 1,
        "price_team": 2,
    }
    assert list(fake.invoices) == [invoice_id]
    invoice = fake.invoices[invoice_id]
    assert invoice["status"] == "paid"
    assert invoice["amount_paid"] == 2 * 800 + 2 * 1500
    assert invoice["metadata"] == METADATA
    assert fake.subscription("sub_1")["metadata"] == METADATA
    assert fake.subscription("sub_1")["latest_invoice"] == invoice_id
    assert fake.updates[-1]["proration_behavior"] == "always_invoice"
    assert fake.updates[-1]["payment_behavior"] == "error_if_incomplete"
    assert [(call.path, call.idempotency_key) for call in fake.posts()] == [
        ("/v1/subscriptions/sub_1", "purchase-p_7"),
        (f"/v1/invoices/{invoice_id}", "purchase-p_7:invoice"),
    ]


def test_an_update_that_raises_nothing_reports_no_invoice(gateway, fake):
    """Given an earlier purchase left an invoice on the subscription,
    When a later purchase finds every quantity already at target (finance raised them),
    Then it reports no invoice and does not relabel the earlier one.
    """
    first = gateway.apply_update("sub_1", _purchase(gateway, {"starter": 4}), "purchase-p_7").id
    later = _purchase(gateway, {"starter": 4}, {**METADATA, "purchase_id": "p_8"})

    assert gateway.apply_update("sub_1", later, "purchase-p_8") is None
    assert fake.invoices[first]["metadata"]["purchase_id"] == "p_7"
    assert len(fake.invoices) == 1


def test_a_lost_response_is_replayed_not_bought_twice(gateway, fake):
    """Given Stripe executes the purchase but the answer is lost on the way back,
    When the gateway retries with the same key,
    Then Stripe replays the stored answer: one invoice, seats raised once, its id returned.
    """
    params = _purchase(gateway, {"starter": 6, "enterprise": 1})
    fake.lose_next_response(1, path="/v1/subscriptions/")

    invoice_id = gateway.apply_update("sub_1", params, "purchase-p_7").id

    assert list(fake.invoices) == [invoice_id]
    assert fake.quantities("sub_1")["price_starter"] == 6
    sub_posts = fake.posts("/v1/subscriptions/")
    assert len(sub_posts) == 2
    assert {call.idempotency_key for call in sub_posts} == {"purchase-p_7"}
    assert sub_posts[0].params == sub_posts[1].params
    assert len(fake.updates) == 1


def test_a_whole_job_retry_after_a_crash_buys_once(gateway, fake):
    """Given a worker died after Stripe executed the purchase (the answer never arrived),
    When the job runs again with the body and key read back from the database,
    Then it gets the same invoice and no second charge.
    """
    params = _purchase(gateway, {"starter": 6})
    fake.lose_next_response(4, path="/v1/subscriptions/")
    with pytest.raises(TransientBillingError):
        gateway.apply_update("sub_1", params, "purchase-p_7")

    invoice_id = gateway.apply_update("sub_1", json.loads(json.dumps(params)), "purchase-p_7").id

    assert list(fake.invoices) == [invoice_id]
    assert len(fake.updates) == 1


def test_a_server_error_then_success_buys_once_with_one_key(gateway, fake):
    """Given Stripe answers 500 before executing, When the gateway retries,
    Then the second attempt buys, with the same key on every attempt, and one invoice exists.
    """
    params = _purchase(gateway, {"starter": 4})
    fake.fail_next(1, status=500, path="/v1/subscriptions/")

    invoice_id = gateway.apply_update("sub_1", params, "purchase-p_7").id

    assert list(fake.invoices) == [invoice_id]
    assert [call.idempotency_key for call in fake.posts("/v1/subscriptions/")] == ["purchase-p_7"] * 2


def test_rate_limits_are_retried(gateway, fake):
    """Given Stripe rate-limits the purchase twice (429), Then the third attempt buys the seats."""
    params = _purchase(gateway, {"starter": 4})
    fake.fail_next(2, status=429, path="/v1/subscriptions/")

    invoice_id = gateway.apply_update("sub_1", params, "purchase-p_7").id

    assert invoice_id in fake.invoices
    assert len(fake.posts("/v1/subscriptions/")) == 3


def test_a_key_still_in_progress_is_retried(gateway, fake):
    """Given Stripe answers 409 idempotency_key_in_use (the same key still running elsewhere),
    Then the gateway waits and retries with the same key.
    """
    params = _purchase(gateway, {"starter": 4})
    fake.fail_next(1, status=409, path="/v1/subscriptions/")

    invoice_id = gateway.apply_update("sub_1", params, "purchase-p_7").id

    assert list(fake.invoices) == [invoice_id]


def test_the_library_does_not_retry_on_its_own(fake):
    """Given one attempt allowed and one 500, Then exactly one request is sent:
    the stripe library's own retries are off, so tenacity alone counts attempts.
    """
    gateway = StripeGateway(fake.api_key, PRICES, api_base=fake.url, attempts=1, wait_seconds=0.01)
    params = _purchase(gateway, {"starter": 4})
    fake.fail_next(1, status=500)

    with pytest.raises(TransientBillingError):
        gateway.apply_update("sub_1", params, "purchase-p_7")

    assert len(fake.posts()) == 1


def test_exhausted_retries_are_transient(gateway, fake):
    """Given Stripe keeps answering 500, When every attempt is used,
    Then the error is transient (the job retries later with the same key) and nothing was bought.
    """
    params = _purchase(gateway, {"starter": 4})
    fake.fail_next(4, status=500)

    with pytest.raises(TransientBillingError) as caught:
        gateway.apply_update("sub_1", params, "purchase-p_7")

    assert caught.value.status == 500
    assert len(fake.posts()) == 4
    assert fake.invoices == {}
    assert fake.quantities("sub_1")["price_starter"] == 3


def test_a_stored_server_error_stays_transient(gateway, fake):
    """Given a 500 that Stripe saved under the key (it replays it for every retry),
    Then the gateway never turns it into a permanent refusal.
    """
    params = _purchase(gateway, {"starter": 4})
    fake.fail_next(1, status=500, stored=True)

    with pytest.raises(TransientBillingError):
        gateway.apply_update("sub_1", params, "purchase-p_7")

    assert len(fake.posts()) == 4


def test_an_unreachable_stripe_is_transient():
    """Given nothing listens at the API base, Then reading fails as transient, not permanent."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway = StripeGateway("sk_test_x", PRICES, api_base=f"http://127.0.0.1:{port}", attempts=2, wait_seconds=0.01)

    with pytest.raises(TransientBillingError) as caught:
        gateway.read_subscription("sub_1")

    assert "APIConnectionError" in caught.value.reason


def test_a_declined_card_is_permanent_with_its_reason(gateway, fake):
    """Given Stripe declines the card (402), When the purchase is applied,
    Then it fails at once, permanently, with Stripe's code, decline code and message,
    never the API key, and the subscription is unchanged.
    """
    params = _purchase(gateway, {"starter": 4})
    fake.fail_next(1, status=402, decline_code="insufficient_funds")

    with pytest.raises(PermanentBillingError) as caught:
        gateway.apply_update("sub_1", params, "purchase-p_7")

    reason = caught.value.reason
    assert "card_declined" in reason
    assert "insufficient_funds" in reason
    assert "Your card was declined." in reason
    assert fake.api_key not in reason
    assert fake.api_key not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    assert len(fake.posts()) == 1
    assert fake.quantities("sub_1")["price_starter"] == 3


def test_a_customer_whose_card_declines_gets_nothing(gateway, fake):
    """Given the customer's card declines every charge and error_if_incomplete is sent,
    When seats are bought, Then Stripe refuses the update, nothing changes, and a retry replays the refusal.
    """
    fake.decline_payments("cus_1", decline_code="expired_card")
    params = _purchase(gateway, {"starter": 5})

    with pytest.raises(PermanentBillingError, match="expired_card"):
        gateway.apply_update("sub_1", params, "purchase-p_7")
    with pytest.raises(PermanentBillingError, match="expired_card"):
        gateway.apply_update("sub_1", params, "purchase-p_7")

    assert fake.quantities("sub_1")["price_starter"] == 3
    assert fake.invoices == {}


def test_an_invalid_request_is_permanent(gateway, fake):
    """Given Stripe rejects the parameters (400), Then the failure is permanent and not retried."""
    params = _purchase(gateway, {"starter": 4})
    fake.fail_next(1, status=400, code="parameter_invalid_integer", message="Invalid integer: x")

    with pytest.raises(PermanentBillingError, match="parameter_invalid_integer"):
        gateway.apply_update("sub_1", params, "purchase-p_7")

    assert len(fake.posts()) == 1


def test_the_same_key_with_another_body_is_a_permanent_error(gateway, fake):
    """Given a key already used to buy 4 starter seats,
    When a different body is sent with that key (a recomputed body),
    Then Stripe's idempotency check refuses it, surfaced as permanent, and the first purchase stands.
    """
    gateway.apply_update("sub_1", _purchase(gateway, {"starter": 4}), "purchase-p_7")
    recomputed = _purchase(gateway, {"starter": 9})

    with pytest.raises(PermanentBillingError) as caught:
        gateway.apply_update("sub_1", recomputed, "purchase-p_7")

    assert "idempotency" in caught.value.reason.lower()
    assert caught.value.status == 400
    assert fake.quantities("sub_1")["price_starter"] == 4
    assert len(fake.invoices) == 1


def test_a_wrong_api_key_is_permanent_and_never_shown(fake):
    """Given an API key Stripe does not accept (the fake even echoes it back),
    Then the failure is permanent and its reason hides the key.
    """
    wrong_key = "sk_test_wrong_secret_value"
    gateway = StripeGateway(wrong_key, PRICES, api_base=fake.url, wait_seconds=0.01)

    with pytest.raises(PermanentBillingError) as caught:
        gateway.read_subscription("sub_1")

    assert caught.value.status == 401
    assert wrong_key not in caught.value.reason
    assert "[redacted]" in caught.value.reason
    assert wrong_key not in repr(gateway)


# -- labelling the invoice ---------------------------------------------------


def test_a_lost_answer_when_labelling_the_invoice_is_retried(gateway, fake):
    """Given the invoice label's answer is lost, Then it is retried with the ":invoice" key and applied once."""
    params = _purchase(gateway, {"starter": 4})
    fake.lose_next_response(1, path="/v1/invoices/")

    invoice_id = gateway.apply_update("sub_1", params, "purchase-p_7").id

    assert fake.invoices[invoice_id]["metadata"] == METADATA
    assert [call.idempotency_key for call in fake.posts("/v1/invoices/")] == ["purchase-p_7:invoice"] * 2


def test_a_refused_invoice_label_does_not_undo_a_paid_purchase(gateway, fake):
    """Given Stripe refuses to label the invoice for good,
    Then the purchase still reports its invoice (the seats are bought and paid),
    whose subscription snapshot still carries the metadata for finance.
    """
    params = _purchase(gateway, {"starter": 4})
    fake.fail_next(1, status=400, path="/v1/invoices/")

    invoice_id = gateway.apply_update("sub_1", params, "purchase-p_7").id

    assert invoice_id in fake.invoices
    assert fake.invoices[invoice_id]["parent"]["subscription_details"]["metadata"] == METADATA


def test_a_body_stored_without_expand_still_finds_its_invoice(gateway, fake):
    """Given a stored body without expand[] (latest_invoice comes back as an id),
    Then the gateway fetches the invoice to check it is this purchase's, and returns it.
    """
    params = _purchase(gateway, {"starter": 4})
    del params["expand"]

    invoice_id = gateway.apply_update("sub_1", params, "purchase-p_7").id

    assert list(fake.invoices) == [invoice_id]
    assert ("GET", f"/v1/invoices/{invoice_id}") in [(call.method, call.path) for call in fake.calls]


# -- the fake's wire format ----------------------------------------------------


def test_the_fake_decodes_stripe_form_keys():
    """Given Stripe-style bracket keys, Then the fake rebuilds lists, nested objects and metadata."""
    params = parse_form(
        [
            ("items[0][id]", "si_1"),
            ("items[0][quantity]", "5"),
            ("items[1][price]", "price_team"),
            ("metadata[0]", "kept as a key"),
            ("metadata[note]", ""),
            ("expand[]", "latest_invoice"),
            ("expand[]", "customer"),
        ]
    )

    assert params == {
        "items": [{"id": "si_1", "quantity": "5"}, {"price": "price_team"}],
        "metadata": {"0": "kept as a key", "note": ""},
        "expand": ["latest_invoice", "customer"],
    }


# -- limits --------------------------------------------------------------------


def test_a_stripe_that_never_answers_frees_the_caller_within_the_timeout(fake):
    """Given Stripe accepts the connection and never answers (a blackhole),
    When a read is made with a 0.5 s timeout and 2 attempts,
    Then it fails as transient (the same key may be retried) within about the attempts' timeouts,
    not after the library's default 80 s.
    """
    gateway = StripeGateway(fake.api_key, PRICES, api_base=fake.url, attempts=2, wait_seconds=0.01, timeout=0.5)
    fake.blackhole()
    started = time.monotonic()
    try:
        with pytest.raises(TransientBillingError):
            gateway.read_subscription("sub_1")
    finally:
        fake.blackhole(False)
    assert time.monotonic() - started < 5


def test_a_timeout_above_twenty_seconds_is_refused(fake):
    """Stripe calls have an explicit timeout of at most 20 s (issue 9)."""
    with pytest.raises(ValueError):
        StripeGateway(fake.api_key, PRICES, api_base=fake.url, timeout=21)


def test_a_refused_api_key_is_an_auth_error(fake):
    """Given a key Stripe refuses (401), Then the error is permanent, flagged as ours to fix, and never shows the key."""
    gateway = StripeGateway("sk_test_wrong_key_999", PRICES, api_base=fake.url, attempts=1)
    with pytest.raises(PermanentBillingError) as caught:
        gateway.read_subscription("sub_1")
    assert caught.value.is_auth and caught.value.status == 401
    assert "sk_test_wrong_key_999" not in caught.value.reason


def test_find_invoice_recognises_the_purchase_by_its_metadata(gateway, fake):
    """Given a purchase's update made the latest invoice, Then find_invoice returns it for that purchase only."""
    params = _purchase(gateway, {"starter": 4}, {"sally_purchase_id": "p_9", "sally_tenant_id": "t_1"})
    made = gateway.apply_update("sub_1", params, "purchase-p_9")

    assert gateway.find_invoice("sub_1", "p_9") == made
    assert gateway.find_invoice("sub_1", "p_other") is None
