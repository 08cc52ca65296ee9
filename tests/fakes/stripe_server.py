"""A local HTTP fake of the slice of the Stripe API that billing/ uses.

It speaks Stripe's wire format, so tests drive the real ``stripe`` library
against it (``StripeClient(..., base_addresses={"api": fake.url})``):

- form-encoded bodies with bracket keys (``items[0][id]``, ``metadata[k]``,
  ``expand[0]`` / ``expand[]``), Bearer API key (anything else: 401);
- ``GET``/``POST /v1/subscriptions/{id}``, ``GET``/``POST /v1/invoices/{id}``;
- ``Idempotency-Key`` on POST: same key and same parameters replay the stored
  response with no side effect; same key and other parameters (or another
  endpoint) answer 400 ``idempotency_error``;
- errors shaped ``{"error": {"type", "code", "message", ...}}``.

Fault injection (``fail_next``, ``lose_next_response``, ``decline_payments``,
``blackhole`` — accept connections and never answer) and inspection (``calls``, ``invoices``, ``updates``, ``subscription()``) are
for assertions. Queued faults form one queue: each is taken, in order, by the
first request whose path it matches (any path when none was given). Use it as a context manager, or in a fixture::

    @pytest.fixture
    def stripe_fake():
        with FakeStripe() as fake:
            yield fake

Webhooks: every change the fake makes (a subscription update, an invoice
created, paid or failed) is recorded as a Stripe event in ``events``, with
Stripe's shape (``id``, ``type``, ``created``, ``data.object``).
``deliver(url, event)`` POSTs one to a webhook endpoint signed the way Stripe
signs (``Stripe-Signature: t=<unix time>,v1=<HMAC-SHA256 of "t.payload">``
with ``webhook_secret``), so tests can deliver them late, twice or out of order.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

DEFAULT_API_KEY = "sk_test_fake_0123456789"
DEFAULT_WEBHOOK_SECRET = "whsec_fake_0123456789abcdef"
DEFAULT_UNIT_AMOUNT = 1000  # cents, for prices the test did not price


class Call(NamedTuple):
    """One request the fake received (faulted, refused and replayed ones included)."""

    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None


@dataclass
class _Fault:
    kind: str  # "fail" or "lose"
    path: str | None
    status: int = 500
    body: dict[str, Any] | None = None
    stored: bool = False
    method: str | None = None


class _Response(NamedTuple):
    status: int
    body: dict[str, Any]
    replayed: bool = False


class _StripeFailure(Exception):
    """An error answer, raised inside a route and turned into Stripe's error body."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.response = _Response(status, {"error": error})


_DEFAULT_ERRORS: dict[int, dict[str, Any]] = {
    400: {"type": "invalid_request_error", "code": "parameter_invalid_empty", "message": "Invalid request (injected)."},
    402: {
        "type": "card_error",
        "code": "card_declined",
        "decline_code": "generic_decline",
        "message": "Your card was declined.",
    },
    404: {"type": "invalid_request_error", "code": "resource_missing", "message": "No such object (injected)."},
    409: {
        # What Stripe answers while another request with the same key is running.
        "type": "invalid_request_error",
        "code": "idempotency_key_in_use",
        "message": "There is currently another in-progress request using this Idempotency Key.",
    },
    429: {"type": "invalid_request_error", "code": "rate_limit", "message": "Request rate limit exceeded."},
}


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Decode Stripe-style bracket keys (``a[0][b]=1``, ``m[k]=v``, ``e[]=x``) into nested values."""
    root: dict[str, Any] = {}
    for raw_key, value in pairs:
        match = re.fullmatch(r"([^\[\]]+)((?:\[[^\[\]]*\])*)", raw_key)
        if match is None:
            raise _StripeFailure(400, _error("parameter_unknown", f"Invalid parameter name: {raw_key}"))
        parts = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node = root
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if part == "":
                # "expand[]=x": append; a numbered slot keeps the order of arrival.
                part = str(len(node))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise _StripeFailure(400, _error("parameter_invalid", f"Invalid parameter: {raw_key}"))
    return _lists_from_numbered_dicts(root)


def _lists_from_numbered_dicts(node: Any, key: str | None = None) -> Any:
    if not isinstance(node, dict):
        return node
    if key == "metadata":
        # Metadata keys are free text ("0" included): never a list.
        return dict(node)
    converted = {k: _lists_from_numbered_dicts(v, k) for k, v in node.items()}
    if key is not None and converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def _error(code: str | None, message: str, type_: str = "invalid_request_error", **extra: Any) -> dict[str, Any]:
    error = {"type": type_, "code": code, "message": message}
    error.update(extra)
    return error


class FakeStripe:
    """A threaded local Stripe look-alike: subscriptions, invoices, idempotency and faults."""

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        unit_amounts: dict[str, int] | None = None,
        webhook_secret: str = DEFAULT_WEBHOOK_SECRET,
    ) -> None:
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.events: list[dict[str, Any]] = []
        # Stripe's `created` is in whole seconds; events the fake makes in one
        # second still get increasing values, so their order is unambiguous.
        self._clock = int(time.time())
        self.unit_amounts: dict[str, int] = dict(unit_amounts or {})
        self.calls: list[Call] = []
        self.invoices: dict[str, dict[str, Any]] = {}
        self.updates: list[dict[str, Any]] = []
        self._subscriptions: dict[str, dict[str, Any]] = {}
        self._idempotency: dict[tuple[str, str], tuple[str, str, dict[str, Any], _Response]] = {}
        self._faults: deque[_Fault] = deque()
        self._declining: dict[str, str] = {}
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Set while black-holed; requests wait on _released, then go unanswered.
        self._black_holed = False
        self._released = threading.Event()
        self.unanswered = 0

    # -- life cycle -------------------------------------------------------

    def start(self) -> FakeStripe:
        """Listen on 127.0.0.1 on a free port, in a daemon thread."""
        handler = type("_BoundHandler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            # A short poll makes shutdown() return at once instead of after 0.5 s.
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fake-stripe",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and release the port."""
        self.answer_again()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base address to give the stripe library (``base_addresses={"api": url}``)."""
        if self._server is None:
            raise RuntimeError("the fake Stripe server is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget every object, call, key and pending fault (for a server shared across tests)."""
        with self._lock:
            self.calls.clear()
            self.invoices.clear()
            self.updates.clear()
            self._subscriptions.clear()
            self._idempotency.clear()
            self._faults.clear()
            self._declining.clear()
            self.events.clear()
        self.answer_again()

    # -- seeding and inspection --------------------------------------------

    def add_subscription(
        self,
        subscription_id: str,
        *,
        customer: str,
        items: dict[str, int],
        metadata: dict[str, str] | None = None,
        status: str = "active",
    ) -> dict[str, Any]:
        """Seed a subscription with one item per price (``{"price_starter": 3}``)."""
        with self._lock:
            subscription = {
                "id": subscription_id,
                "object": "subscription",
                "customer": customer,
                "status": status,
                "currency": "usd",
                "metadata": dict(metadata or {}),
                "latest_invoice": None,
                "items": {
                    "object": "list",
                    "data": [],
                    "has_more": False,
                    "url": f"/v1/subscription_items?subscription={subscription_id}",
                },
            }
            for price, quantity in items.items():
                subscription["items"]["data"].append(self._new_item(subscription_id, price, quantity))
            subscription["items"]["total_count"] = len(subscription["items"]["data"])
            self._subscriptions[subscription_id] = subscription
            return copy.deepcopy(subscription)

    def subscription(self, subscription_id: str) -> dict[str, Any]:
        """The stored subscription, as Stripe would return it (a copy)."""
        with self._lock:
            return copy.deepcopy(self._subscriptions[subscription_id])

    def quantities(self, subscription_id: str) -> dict[str, int]:
        """Price id -> quantity of a subscription's items."""
        with self._lock:
            items = self._subscriptions[subscription_id]["items"]["data"]
            return {item["price"]["id"]: item["quantity"] for item in items}

    def posts(self, path_prefix: str = "/v1/") -> list[Call]:
        """The POST calls received under a path prefix."""
        with self._lock:
            return [call for call in self.calls if call.method == "POST" and call.path.startswith(path_prefix)]

    # -- fault injection ---------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        code: str | None = None,
        message: str | None = None,
        decline_code: str | None = None,
        path: str | None = None,
        stored: bool | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests (under ``path`` if given) with an error, before any work.

        Such a failure happens in front of the endpoint (rate limiter, load
        balancer), so it is not saved under the idempotency key, except when
        ``stored`` is true: then it is saved like an endpoint's own answer and
        every retry with the key replays it, as Stripe does for a 500 raised
        mid-execution. ``stored`` defaults to true for 402 (the charge ran).
        """
        server_error = {"type": "api_error", "code": None, "message": "Internal error (injected)."}
        error = dict(_DEFAULT_ERRORS.get(status, server_error))
        if code is not None:
            error["code"] = code
        if message is not None:
            error["message"] = message
        if decline_code is not None:
            error["decline_code"] = decline_code
        keep = (status == 402) if stored is None else stored
        with self._lock:
            for _ in range(n):
                self._faults.append(_Fault("fail", path, status, {"error": error}, keep, method))

    def lose_next_response(self, n: int = 1, *, path: str | None = None, method: str | None = None) -> None:
        """Process the next ``n`` requests (under ``path``, with ``method``, if given), then close the connection unanswered."""
        with self._lock:
            for _ in range(n):
                self._faults.append(_Fault("lose", path, method=method))

    def blackhole(self, on: bool = True) -> None:
        """From now on, take each connection and never answer it (a network partition, a hung
        load balancer): the client sees its own timeout. Nothing is processed meanwhile.
        ``blackhole(False)`` is ``answer_again()``."""
        if not on:
            self.answer_again()
            return
        with self._lock:
            self._black_holed = True
            self._released.clear()

    def answer_again(self) -> None:
        """End the black hole: held requests are dropped unanswered, new ones are served."""
        with self._lock:
            self._black_holed = False
            self._released.set()

    def _hold_if_black_holed(self) -> bool:
        """Called by a handler thread: True when the request was swallowed."""
        with self._lock:
            if not self._black_holed:
                return False
            self.unanswered += 1
        # Bounded, so that a forgotten black hole cannot keep a thread forever.
        self._released.wait(timeout=300)
        return True

    def decline_payments(self, customer: str, decline_code: str = "insufficient_funds") -> None:
        """Make every charge to this customer's card fail from now on."""
        with self._lock:
            self._declining[customer] = decline_code

    @property
    def in_blackhole(self) -> bool:
        """Whether requests are being swallowed now."""
        return self._black_holed

    # -- webhooks ------------------------------------------------------------

    def _tick(self) -> int:
        self._clock = max(self._clock + 1, int(time.time()))
        return self._clock

    def emit(self, type_: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record (and return) an event about ``obj`` as Stripe would send it."""
        with self._lock:
            event = {
                "id": f"evt_fake{next(self._ids):06d}",
                "object": "event",
                "api_version": "2025-03-31.basil",
                "created": self._tick(),
                "livemode": False,
                "pending_webhooks": 1,
                "request": {"id": None, "idempotency_key": None},
                "type": type_,
                "data": {"object": copy.deepcopy(obj)},
            }
            if previous is not None:
                event["data"]["previous_attributes"] = copy.deepcopy(previous)
            self.events.append(event)
            return copy.deepcopy(event)

    def events_of(self, type_: str) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(e) for e in self.events if e["type"] == type_]

    def sign(self, payload: bytes, timestamp: int | None = None, secret: str | None = None) -> str:
        """The Stripe-Signature header Stripe would send for ``payload`` (HMAC-SHA256, scheme v1)."""
        moment = int(time.time()) if timestamp is None else timestamp
        key = (secret or self.webhook_secret).encode()
        digest = hmac.new(key, f"{moment}.".encode() + payload, hashlib.sha256).hexdigest()
        return f"t={moment},v1={digest}"

    def signed(
        self, event: dict[str, Any], *, signature: str | None = "sign", timestamp: int | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The body and headers of a delivery of ``event`` (``signature``: "sign", a header value, or None)."""
        payload = json.dumps(event).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"}
        if signature == "sign":
            headers["Stripe-Signature"] = self.sign(payload, timestamp)
        elif signature is not None:
            headers["Stripe-Signature"] = signature
        return payload, headers

    def deliver(
        self, url: str, event: dict[str, Any], *, signature: str | None = "sign", timestamp: int | None = None
    ) -> tuple[int, bytes]:
        """POST one event to a webhook endpoint, signed (or with ``signature`` as given; None: no header)."""
        payload, headers = self.signed(event, signature=signature, timestamp=timestamp)
        request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def pay_invoice(self, invoice_id: str) -> dict[str, Any]:
        """Finance collects an open invoice: it becomes paid (invoice.paid)."""
        with self._lock:
            invoice = self.invoices[invoice_id]
            invoice["status"] = "paid"
            invoice["amount_paid"] = invoice["amount_due"]
            invoice["amount_remaining"] = 0
            invoice["status_transitions"]["paid_at"] = self._tick()
            return self.emit("invoice.paid", invoice)

    def fail_invoice_payment(self, invoice_id: str) -> dict[str, Any]:
        """A payment attempt on an open invoice fails (invoice.payment_failed); it stays open."""
        with self._lock:
            invoice = self.invoices[invoice_id]
            invoice["attempt_count"] = invoice.get("attempt_count", 0) + 1
            return self.emit("invoice.payment_failed", invoice)

    # -- request handling (called by the handler threads) --------------------

    def handle(
        self, method: str, raw_path: str, authorization: str | None, idempotency_key: str | None, body: str
    ) -> _Response | None:
        """Answer one request; None means: close the connection without an answer."""
        split = urlsplit(raw_path)
        pairs = parse_qsl(split.query if method == "GET" else body, keep_blank_values=True)
        with self._lock:
            try:
                params = parse_form(pairs)
            except _StripeFailure as failure:
                self.calls.append(Call(method, split.path, {}, idempotency_key))
                return failure.response
            self.calls.append(Call(method, split.path, copy.deepcopy(params), idempotency_key))

            if authorization != f"Bearer {self.api_key}":
                presented = (authorization or "").removeprefix("Bearer ")
                # Real Stripe masks the key; echoing it whole tests that callers never show it.
                return _Response(401, {"error": _error(None, f"Invalid API Key provided: {presented}")})

            fault = self._take_fault(method, split.path)
            key = (self.api_key, idempotency_key) if method == "POST" and idempotency_key else None
            if fault is not None and fault.kind == "fail":
                response = _Response(fault.status, copy.deepcopy(fault.body or {}))
                if fault.stored and key is not None and key not in self._idempotency:
                    self._idempotency[key] = (method, split.path, params, response)
                return response

            if key is not None and key in self._idempotency:
                response = self._replay(key, method, split.path, params)
            else:
                try:
                    response = self._route(method, split.path, params)
                except _StripeFailure as failure:
                    response = failure.response
                # Validation errors (400) never began executing: Stripe saves no result for them.
                if key is not None and response.status != 400:
                    self._idempotency[key] = (method, split.path, params, response)

            if fault is not None and fault.kind == "lose":
                return None
            return response

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if (fault.path is None or path.startswith(fault.path)) and fault.method in (None, method):
                self._faults.remove(fault)
                return fault
        return None

    def _replay(self, key: tuple[str, str], method: str, path: str, params: dict[str, Any]) -> _Response:
        stored_method, stored_path, stored_params, stored_response = self._idempotency[key]
        if (stored_method, stored_path) != (method, path) or stored_params != params:
            return _Response(
                400,
                {
                    "error": _error(
                        None,
                        "Keys for idempotent requests can only be used with the same parameters they were first "
                        f"used with. Try using a key other than '{key[1]}' if you meant to execute a different "
                        "request.",
                        type_="idempotency_error",
                    )
                },
            )
        return _Response(stored_response.status, copy.deepcopy(stored_response.body), replayed=True)

    def _route(self, method: str, path: str, params: dict[str, Any]) -> _Response:
        match = re.fullmatch(r"/v1/(subscriptions|invoices)/([^/]+)", path)
        if match is None or method not in ("GET", "POST"):
            raise _StripeFailure(404, _error(None, f"Unrecognized request URL ({method}: {path})."))
        resource, object_id = match.groups()
        if resource == "subscriptions":
            if object_id not in self._subscriptions:
                raise _StripeFailure(
                    404, _error("resource_missing", f"No such subscription: '{object_id}'", param="id")
                )
            if method == "POST":
                self._update_subscription(object_id, params)
            return _Response(200, self._render_subscription(object_id, params.get("expand", [])))
        if object_id not in self.invoices:
            raise _StripeFailure(404, _error("resource_missing", f"No such invoice: '{object_id}'", param="id"))
        if method == "POST":
            self._check_known(params, {"metadata", "description", "expand"})
            _merge_metadata(self.invoices[object_id]["metadata"], params.get("metadata", {}))
        return _Response(200, copy.deepcopy(self.invoices[object_id]))

    def _update_subscription(self, subscription_id: str, params: dict[str, Any]) -> None:
        self._check_known(params, {"items", "metadata", "proration_behavior", "payment_behavior", "expand"})
        subscription = self._subscriptions[subscription_id]
        items = subscription["items"]["data"]
        by_id = {item["id"]: item for item in items}
        before = {item["price"]["id"]: item["quantity"] for item in items}

        # Work on a copy: with error_if_incomplete a declined charge leaves nothing changed.
        after = dict(before)
        new_prices: list[str] = []
        for index, change in enumerate(params.get("items", [])):
            if not isinstance(change, dict):
                raise _StripeFailure(400, _error("parameter_invalid", f"Invalid items[{index}]", param="items"))
            quantity = _quantity(change.get("quantity"), f"items[{index}][quantity]")
            if "id" in change:
                item = by_id.get(change["id"])
                if item is None:
                    raise _StripeFailure(
                        400,
                        _error(
                            "resource_missing",
                            f"Invalid subscription_item id: {change['id']}",
                            param=f"items[{index}][id]",
                        ),
                    )
                if quantity is not None:
                    after[item["price"]["id"]] = quantity
            elif "price" in change:
                price = change["price"]
                if price in after:
                    raise _StripeFailure(
                        400,
                        _error(
                            "parameter_invalid",
                            f"Cannot add multiple subscription items with the same price: {price}",
                            param=f"items[{index}][price]",
                        ),
                    )
                after[price] = 1 if quantity is None else quantity
                new_prices.append(price)
            else:
                raise _StripeFailure(400, _error("parameter_missing", f"Missing items[{index}][id] or [price]"))

        proration = params.get("proration_behavior", "create_prorations")
        payment = params.get("payment_behavior", "allow_incomplete")
        added = {price: after[price] - before.get(price, 0) for price in after if after[price] > before.get(price, 0)}
        amount = sum(delta * self.unit_amounts.get(price, DEFAULT_UNIT_AMOUNT) for price, delta in added.items())
        invoice_now = proration == "always_invoice" and amount > 0
        decline = self._declining.get(subscription["customer"]) if invoice_now else None
        if decline is not None and payment == "error_if_incomplete":
            raise _StripeFailure(
                402,
                _error("card_declined", "Your card was declined.", type_="card_error", decline_code=decline),
            )

        for item in items:
            item["quantity"] = after[item["price"]["id"]]
        for price in new_prices:
            items.append(self._new_item(subscription_id, price, after[price]))
        subscription["items"]["total_count"] = len(items)
        _merge_metadata(subscription["metadata"], params.get("metadata", {}))

        invoice_id = None
        if invoice_now:
            invoice_id = self._new_invoice(subscription, added, amount, paid=decline is None)
            subscription["latest_invoice"] = invoice_id
        self.emit(
            "customer.subscription.updated",
            subscription,
            previous={"items": {"data": [{"price": {"id": p}, "quantity": q} for p, q in before.items()]}},
        )
        if invoice_id is not None:
            self.emit("invoice.finalized", {**self.invoices[invoice_id], "status": "open",
                                            "amount_paid": 0, "status_transitions": {"finalized_at": self._clock,
                                                                                      "paid_at": None}})
            if decline is None:
                self.emit("invoice.paid", self.invoices[invoice_id])
        self.updates.append(
            {
                "subscription": subscription_id,
                "before": before,
                "after": after,
                "proration_behavior": proration,
                "payment_behavior": payment,
                "invoice": invoice_id,
            }
        )

    def _new_item(self, subscription_id: str, price: str, quantity: int) -> dict[str, Any]:
        return {
            "id": f"si_fake{next(self._ids):06d}",
            "object": "subscription_item",
            "subscription": subscription_id,
            "quantity": quantity,
            "price": {
                "id": price,
                "object": "price",
                "currency": "usd",
                "unit_amount": self.unit_amounts.get(price, DEFAULT_UNIT_AMOUNT),
            },
        }

    def _new_invoice(self, subscription: dict[str, Any], added: dict[str, int], amount: int, *, paid: bool) -> str:
        invoice_id = f"in_fake{next(self._ids):06d}"
        finalized = self._tick()
        self.invoices[invoice_id] = {
            "id": invoice_id,
            "object": "invoice",
            "created": finalized,
            "subscription": subscription["id"],
            "status_transitions": {"finalized_at": finalized, "paid_at": self._tick() if paid else None},
            "customer": subscription["customer"],
            "status": "paid" if paid else "open",
            "billing_reason": "subscription_update",
            "currency": "usd",
            "amount_due": amount,
            "amount_paid": amount if paid else 0,
            "amount_remaining": 0 if paid else amount,
            "metadata": {},
            # Stripe snapshots the subscription's metadata onto the invoice it creates.
            "parent": {
                "type": "subscription_details",
                "quote_details": None,
                "subscription_details": {
                    "subscription": subscription["id"],
                    "metadata": dict(subscription["metadata"]),
                },
            },
            "lines": {
                "object": "list",
                "has_more": False,
                "data": [
                    {
                        "object": "line_item",
                        "id": f"il_fake{next(self._ids):06d}",
                        "quantity": delta,
                        "amount": delta * self.unit_amounts.get(price, DEFAULT_UNIT_AMOUNT),
                        "pricing": {"type": "price_details", "price_details": {"price": price}},
                    }
                    for price, delta in added.items()
                ],
            },
        }
        return invoice_id

    def _render_subscription(self, subscription_id: str, expand: list[str]) -> dict[str, Any]:
        body = copy.deepcopy(self._subscriptions[subscription_id])
        if "latest_invoice" in expand and body["latest_invoice"] is not None:
            body["latest_invoice"] = copy.deepcopy(self.invoices[body["latest_invoice"]])
        return body

    @staticmethod
    def _check_known(params: dict[str, Any], allowed: set[str]) -> None:
        for name in params:
            if name not in allowed:
                raise _StripeFailure(
                    400, _error("parameter_unknown", f"Received unknown parameter: {name}", param=name)
                )


def _quantity(value: Any, param: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.isdigit():
        raise _StripeFailure(400, _error("parameter_invalid_integer", f"Invalid integer: {value}", param=param))
    return int(value)


def _merge_metadata(target: dict[str, str], changes: Any) -> None:
    if not isinstance(changes, dict):
        raise _StripeFailure(400, _error("parameter_invalid", "Invalid metadata", param="metadata"))
    for key, value in changes.items():
        # As in Stripe: an empty value removes the key.
        if value == "":
            target.pop(key, None)
        else:
            target[key] = value


class _Handler(BaseHTTPRequestHandler):
    fake: FakeStripe  # bound by FakeStripe.start()
    # HTTP/1.0: one request per connection, so a "lost" answer is just a closed socket.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8") if length else ""
        if self.fake._hold_if_black_holed():
            self.close_connection = True
            return
        response = self.fake.handle(
            method,
            self.path,
            self.headers.get("Authorization"),
            self.headers.get("Idempotency-Key"),
            body,
        )
        if response is None:
            self.close_connection = True
            return
        payload = json.dumps(response.body).encode("utf-8")
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Request-Id", f"req_fake{next(self.fake._ids):06d}")
        if response.replayed:
            self.send_header("Idempotent-Replayed", "true")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet: pytest shows the assertions; the access log is noise.
        pass
