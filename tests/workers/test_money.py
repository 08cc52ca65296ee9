"""Money guarded and readable by finance (issue 9), end to end with a real worker and the fake Stripe.

The IdP's requests go to the live SCIM API, the admin uses the admin API,
Stripe's webhook events (made by the fake Stripe when anything changes there,
signed like Stripe signs them) are delivered to the live /stripe/webhook, and
a real `sally-scim worker` calls the fake Stripe through the real `stripe`
library. Assertions are on what the admin, finance and Stripe see.
"""

from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import stripe

from tests.conftest import connect_tenant
from tests.workers.support import (
    TIERS,
    Idp,
    WorkerProcess,
    licenses,
    purchases,
    sally_scim_command,
    save_mapping,
    stripe_fake,
    subscription_posts,
    users_by_id,
    wait_caught_up,
    wait_seats_read,
    wait_until,
)


@pytest.fixture
def stack(admin, base_settings, tmp_path: Path) -> Iterator[tuple[Any, WorkerProcess]]:
    """Fake Stripe and one running worker; the worker's process group is killed after."""
    with stripe_fake() as fake:
        worker = WorkerProcess(base_settings, tmp_path / "worker", fake)
        worker.start()
        try:
            yield fake, worker
        finally:
            worker.kill()


def finance_sets(fake, subscription_id: str, price: str, quantity: int) -> None:
    """Finance edits a quantity by hand in Stripe's dashboard (no invoice: proration off)."""
    client = stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url}, max_network_retries=0)
    item = next(i["id"] for i in fake.subscription(subscription_id)["items"]["data"] if i["price"]["id"] == price)
    client.v1.subscriptions.update(
        subscription_id, params={"items": [{"id": item, "quantity": quantity}], "proration_behavior": "none"})


def deliver_new_events(fake, live_server, seen: set[str]) -> None:
    """Deliver every event the fake made since the last call, in order, to the live webhook."""
    for event in list(fake.events):
        if event["id"] in seen:
            continue
        status, body = fake.deliver(f"{live_server.url}/stripe/webhook", event)
        assert status == 200, body
        seen.add(event["id"])


def people(idp: Idp, prefix: str, n: int, group: str) -> list[str]:
    ids = idp.create_users({"user_name": f"{prefix}{i}@acme.example"} for i in range(n))
    idp.add_memberships({group: ids})
    return ids


def statuses(admin: httpx.Client, tenant_id: str, ids: list[str]) -> dict[str, int]:
    users = users_by_id(admin, tenant_id)
    out: dict[str, int] = {}
    for uid in ids:
        out[users[uid]["status"]] = out.get(users[uid]["status"], 0) + 1
    return out


def test_finance_lowering_and_raising_seats_by_hand_becomes_the_truth_at_once(admin, live_server, stack):
    """Given a billed tenant with 10 starter seats, all 10 held,
    When finance lowers starter to 6 by hand in Stripe (webhook customer.subscription.updated),
    Then Sally reads 6 at once, 4 users go pending_license with the reason and no seat is bought back
    behind finance's back: the purchase that would do it waits for the admin's approval (no Stripe POST).
    When finance then raises starter to 12 by hand, Then the 4 users get seats at once, the held
    purchase ends as no longer needed, and Sally still never called Stripe to buy.
    """
    fake, worker = stack
    fake.add_subscription("sub_fin", customer="cus_fin", items={"price_starter": 10})
    scim = connect_tenant(admin, "Finance", stripe_customer_id="cus_fin", stripe_subscription_id="sub_fin")
    t = scim.tenant_id
    wait_seats_read(admin, t, {"starter": 10, "team": 0, "enterprise": 0}, worker)
    with Idp(scim.tenant_url, scim.token) as idp:
        group = idp.create_group("Starter")
        ids = people(idp, "f", 10, group)
    save_mapping(admin, t, user_groups=[group], license_groups={"starter": [group]})
    wait_caught_up(admin, t, worker=worker)
    assert statuses(admin, t, ids) == {"active": 10}
    seen: set[str] = set()

    finance_sets(fake, "sub_fin", "price_starter", 6)
    deliver_new_events(fake, live_server, seen)

    wait_until(lambda: licenses(admin, t)["starter"] == {"purchased": 6, "assigned": 6},
               timeout=30, what="the lowered seats read and taken back", worker=worker)
    wait_caught_up(admin, t, worker=worker)
    users = users_by_id(admin, t)
    waiting = [users[uid] for uid in ids if users[uid]["status"] == "pending_license"]
    assert len(waiting) == 4 and all(u["license"] is None for u in waiting)
    assert all("finance lowered starter to 6" in u["status_reason"] for u in waiting), waiting[0]
    [held] = purchases(admin, t)
    assert held["status"] == "awaiting_approval" and "finance lowered starter to 6" in held["hold_reason"]
    assert admin.get(f"/tenants/{t}/billing").json()["seats_lowered_by_hand"] == {"starter": 6}

    finance_sets(fake, "sub_fin", "price_starter", 12)
    deliver_new_events(fake, live_server, seen)

    wait_until(lambda: licenses(admin, t)["starter"] == {"purchased": 12, "assigned": 10},
               timeout=30, what="the raised seats read and handed out", worker=worker)
    assert statuses(admin, t, ids) == {"active": 10}
    [ended] = purchases(admin, t)
    assert ended["status"] == "cancelled" and "no longer needed" in ended["error"]
    assert subscription_posts(fake, "sub_fin") == [p for p in fake.posts("/v1/subscriptions/sub_fin")
                                                   if p.params.get("proration_behavior") == "none"]
    assert admin.get(f"/tenants/{t}/billing").json()["seats_lowered_by_hand"] is None
    scim.client.close()


def test_a_purchase_above_the_growth_limit_waits_for_approval_then_buys(admin, live_server, stack):
    """Given a billed tenant with 5 starter seats and a guard of max(10, 25 %) with no first-purchase allowance,
    When 30 users need starter seats,
    Then the purchase is held (awaiting_approval) without any Stripe call, 5 users have seats and 25 wait
    with the reason. When the admin approves it, Then it buys 30 in one update and everyone is active.
    When 20 more arrive, the next purchase is held again; the admin cancels it: the users keep waiting with
    the reason, and nothing is bought or re-planned for those seats.
    """
    fake, worker = stack
    fake.add_subscription("sub_g", customer="cus_g", items={"price_starter": 5})
    scim = connect_tenant(admin, "Guarded", stripe_customer_id="cus_g", stripe_subscription_id="sub_g")
    t = scim.tenant_id
    wait_seats_read(admin, t, {"starter": 5, "team": 0, "enterprise": 0}, worker)
    with Idp(scim.tenant_url, scim.token) as idp:
        group = idp.create_group("Starter")
        first = people(idp, "g", 30, group)
    save_mapping(admin, t, user_groups=[group], license_groups={"starter": [group]},
                 spend_guard={"first_purchase_seats": 0})
    wait_caught_up(admin, t, worker=worker)

    [held] = purchases(admin, t)
    assert held["status"] == "awaiting_approval"
    assert "starter 5 → 30 adds 25 seats, more than the 10 allowed" in held["hold_reason"]
    assert subscription_posts(fake, "sub_g") == []
    assert statuses(admin, t, first) == {"active": 5, "pending_license": 25}
    reasons = {u["status_reason"] for u in users_by_id(admin, t).values() if u["status"] == "pending_license"}
    assert len(reasons) == 1 and reasons.pop().startswith("Waiting for the admin to approve")

    approved = admin.post(f"/tenants/{t}/purchases/{held['id']}/approve")
    assert approved.status_code == 200, approved.text
    wait_until(lambda: purchases(admin, t)[0]["status"] == "succeeded", timeout=30, what="the approved purchase",
               worker=worker)
    wait_caught_up(admin, t, worker=worker)
    assert statuses(admin, t, first) == {"active": 30}
    assert fake.quantities("sub_g") == {"price_starter": 30}
    assert len(subscription_posts(fake, "sub_g")) == 1
    assert admin.post(f"/tenants/{t}/purchases/{held['id']}/approve").status_code == 409, "approved once"
    assert admin.post(f"/tenants/{t}/purchases/{held['id']}/cancel").status_code == 409, "settled"

    with Idp(scim.tenant_url, scim.token) as idp:
        more = people(idp, "h", 20, group)
    wait_caught_up(admin, t, worker=worker)
    second = purchases(admin, t)[-1]
    assert second["status"] == "awaiting_approval" and "30 → 50" in second["hold_reason"]
    cancelled = admin.post(f"/tenants/{t}/purchases/{second['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    wait_caught_up(admin, t, worker=worker)
    assert [p["status"] for p in purchases(admin, t)] == ["succeeded", "cancelled"]
    assert statuses(admin, t, more) == {"pending_license": 20}
    reason = users_by_id(admin, t)[more[0]]["status_reason"]
    assert "the admin cancelled the seat purchase" in reason
    assert len(subscription_posts(fake, "sub_g")) == 1
    assert admin.post(f"/tenants/{t}/purchases/nope/approve").status_code == 404
    scim.client.close()


def test_the_csv_ledger_matches_stripes_invoices_line_by_line(admin, live_server, stack, base_settings):
    """Given a billed tenant that buys seats three times (team and enterprise prices differ) with Stripe's
    webhooks delivered, When finance downloads GET …/purchases?format=csv and runs
    `sally-scim purchases export`, Then there is one line per invoice with its id, status, currency and
    amount, the totals equal the invoices' totals, and both exports are the same text.
    """
    fake, worker = stack
    fake.add_subscription("sub_csv", customer="cus_csv", items={"price_team": 1})
    scim = connect_tenant(admin, "Ledger", stripe_customer_id="cus_csv", stripe_subscription_id="sub_csv")
    t = scim.tenant_id
    wait_seats_read(admin, t, {"starter": 0, "team": 1, "enterprise": 0}, worker)
    seen: set[str] = set()
    with Idp(scim.tenant_url, scim.token) as idp:
        team, enterprise = idp.create_group("Team"), idp.create_group("Enterprise")
        save_mapping(admin, t, user_groups=[team, enterprise],
                     license_groups={"team": [team], "enterprise": [enterprise]})
        for wave, (n_team, n_ent) in enumerate([(4, 2), (3, 0), (0, 5)]):
            if n_team:
                people(idp, f"t{wave}_", n_team, team)
            if n_ent:
                people(idp, f"e{wave}_", n_ent, enterprise)
            wait_caught_up(admin, t, worker=worker)
            deliver_new_events(fake, live_server, seen)
    ledger = purchases(admin, t)
    assert [p["status"] for p in ledger] == ["succeeded"] * 3

    response = admin.get(f"/tenants/{t}/purchases", params={"format": "csv"})

    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["stripe_invoice_id"] for r in rows] == [p["stripe_invoice_id"] for p in ledger]
    assert sorted(r["stripe_invoice_id"] for r in rows) == sorted(fake.invoices)
    for row in rows:
        invoice = fake.invoices[row["stripe_invoice_id"]]
        assert int(row["amount_due_minor"]) == invoice["amount_due"]
        assert row["amount_due"] == f"{invoice['amount_due'] // 100}.{invoice['amount_due'] % 100:02d}"
        assert (row["invoice_status"], row["payment_status"], row["currency"]) == ("paid", "paid", "USD")
        assert row["paid_at"]
    assert sum(int(r["amount_due_minor"]) for r in rows) == sum(i["amount_due"] for i in fake.invoices.values())
    assert sum(int(r["amount_paid_minor"]) for r in rows) == sum(i["amount_paid"] for i in fake.invoices.values())
    assert rows[-1]["enterprise_after"] == "7" and rows[-1]["team_after"] == "7"

    exported = subprocess.run(
        [*sally_scim_command(), "purchases", "export", "--tenant", t, "--since", "2000-01-01"],
        env=worker.environment(), capture_output=True, text=True, timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.replace("\r\n", "\n") == response.text.replace("\r\n", "\n")
    later = admin.get(f"/tenants/{t}/purchases", params={"format": "csv", "since": "2999-01-01"})
    assert later.text.count("\n") == 1, "header only"
    assert admin.get(f"/tenants/{t}/purchases", params={"format": "xml"}).status_code == 400
    assert admin.get(f"/tenants/{t}/purchases", params={"since": "yesterday"}).status_code == 400
    scim.client.close()


def test_linking_billing_to_an_existing_tenant_is_checked_by_the_worker(admin, stack):
    """Given a tenant without billing whose users hold not_billed seats,
    When the admin links a subscription of another customer, Then the answer is 202 "unverified" (Stripe is not
    called on the request path) and the worker marks it invalid with the reason, buying nothing.
    When the admin links the right customer's subscription, Then the worker verifies it and reads its seats.
    Linking a subscription another tenant uses is a 409.
    """
    fake, worker = stack
    fake.add_subscription("sub_mine", customer="cus_mine", items={"price_starter": 3})
    fake.add_subscription("sub_theirs", customer="cus_theirs", items={"price_starter": 50})
    scim = connect_tenant(admin, "Late Link")
    t = scim.tenant_id
    with Idp(scim.tenant_url, scim.token) as idp:
        group = idp.create_group("Starter")
        people(idp, "l", 2, group)
    save_mapping(admin, t, user_groups=[group], license_groups={"starter": [group]})
    wait_caught_up(admin, t, worker=worker)
    assert [p["status"] for p in purchases(admin, t)] == ["not_billed"]
    calls_before = len(fake.calls)

    wrong = admin.put(f"/tenants/{t}/billing",
                      json={"stripe_customer_id": "cus_mine", "stripe_subscription_id": "sub_theirs"})
    assert wrong.status_code == 202 and wrong.json()["status"] == "unverified"
    wait_until(lambda: admin.get(f"/tenants/{t}/billing").json()["status"] == "invalid", timeout=30,
               what="the link checked", worker=worker)
    assert "belongs to customer cus_theirs" in admin.get(f"/tenants/{t}/billing").json()["detail"]
    assert len(fake.calls) > calls_before and fake.posts() == []

    right = admin.put(f"/tenants/{t}/billing",
                      json={"stripe_customer_id": "cus_mine", "stripe_subscription_id": "sub_mine"})
    assert right.status_code == 202
    wait_until(lambda: admin.get(f"/tenants/{t}/billing").json()["status"] == "verified", timeout=30,
               what="the link verified", worker=worker)
    wait_seats_read(admin, t, {"starter": 3, "team": 0, "enterprise": 0}, worker)
    assert licenses(admin, t)["starter"] == {"purchased": 3, "assigned": 2}

    other = connect_tenant(admin, "Other")
    taken = admin.put(f"/tenants/{other.tenant_id}/billing",
                      json={"stripe_customer_id": "cus_mine", "stripe_subscription_id": "sub_mine"})
    assert taken.status_code == 409 and taken.json()["error"] == "subscription_in_use"
    assert admin.post("/tenants", json={"name": "Dup", "stripe_customer_id": "cus_mine",
                                        "stripe_subscription_id": "sub_mine"}).status_code == 409
    for bad in ({}, {"stripe_customer_id": "cus_mine"}, {"stripe_customer_id": " ", "stripe_subscription_id": "s"},
                {"stripe_customer_id": "c", "stripe_subscription_id": "s", "extra": 1}):
        assert admin.put(f"/tenants/{t}/billing", json=bad).status_code == 400, bad
    assert {tier: licenses(admin, t)[tier]["purchased"] for tier in TIERS} == {"starter": 3, "team": 0, "enterprise": 0}
    other.client.close()
    scim.client.close()


BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
USER = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ATTACK_USERS = 100_000


def test_a_100000_user_bulk_attack_stops_at_the_guard_without_a_stripe_call(admin, stack):
    """Given a billed tenant with 5 enterprise seats whose Enterprise group gives access, and whose first
    purchase (its first sync: 10 users) is behind it,
    When a holder of its SCIM token creates 100,000 users with /Bulk and puts them all in that group,
    Then the purchase for them is held as awaiting_approval and Stripe sees no call at all (not even a read);
    10 users hold the seats and the rest wait with the guard's reason.
    When the IdP (or the admin) deletes the users again, Then the held purchase ends as no longer needed:
    a purchase never buys for users who are gone.
    """
    fake, worker = stack
    fake.add_subscription("sub_attack", customer="cus_attack", items={"price_enterprise": 5})
    scim = connect_tenant(admin, "Attacked", stripe_customer_id="cus_attack", stripe_subscription_id="sub_attack")
    t = scim.tenant_id
    wait_seats_read(admin, t, {"starter": 0, "team": 0, "enterprise": 5}, worker)
    with Idp(scim.tenant_url, scim.token, concurrency=4) as idp:
        group = idp.create_group("Enterprise")
        people(idp, "legit", 10, group)
        save_mapping(admin, t, user_groups=[group], license_groups={"enterprise": [group]})
        wait_caught_up(admin, t, worker=worker)
        assert [p["status"] for p in purchases(admin, t)] == ["succeeded"]
        calls_before_attack = len(fake.calls)

        def bulk(start: int) -> list[str]:
            count = min(999, ATTACK_USERS - start)
            ops = [{"method": "POST", "path": "/Users", "bulkId": f"u{i}",
                    "data": {"schemas": [USER], "userName": f"x{start + i}@attack.example", "active": True}}
                   for i in range(count)]
            ops.append({"method": "PATCH", "path": f"/Groups/{group}", "data": {"schemas": [PATCH], "Operations": [
                {"op": "add", "path": "members", "value": [{"value": f"bulkId:u{i}"} for i in range(count)]}]}})
            answer = idp.client.post("/Bulk", json={"schemas": [BULK], "Operations": ops}, timeout=300)
            assert answer.status_code == 200, answer.text[:500]
            results = answer.json()["Operations"]
            assert all(r["status"] in ("200", "201", "204") for r in results), results[-1]
            return [r["location"].rsplit("/", 1)[1] for r in results[:-1]]

        created = [uid for ids in idp.pool.map(bulk, range(0, ATTACK_USERS, 999)) for uid in ids]
    assert len(created) == ATTACK_USERS
    wait_caught_up(admin, t, timeout=600, worker=worker)

    first, held = purchases(admin, t)
    assert held["status"] == "awaiting_approval"
    assert held["demand"]["enterprise"] == ATTACK_USERS + 10
    assert f"enterprise 10 → {ATTACK_USERS + 10}" in held["hold_reason"]
    assert len(fake.calls) == calls_before_attack, "no Stripe call: the guard held it at planning"
    assert licenses(admin, t)["enterprise"] == {"purchased": 10, "assigned": 10}
    users = users_by_id(admin, t)
    waiting = [u for u in users.values() if u["status"] == "pending_license"]
    assert len(waiting) == ATTACK_USERS
    assert waiting[0]["status_reason"].startswith("Waiting for the admin to approve")

    # The users go again (here: deactivated in bulk, as an IdP does); the held purchase follows the demand.
    with Idp(scim.tenant_url, scim.token, concurrency=4) as idp:
        def deactivate(start: int) -> None:
            ops = [{"method": "PATCH", "path": f"/Users/{uid}", "data": {"schemas": [PATCH], "Operations": [
                {"op": "replace", "path": "active", "value": False}]}} for uid in created[start:start + 1000]]
            answer = idp.client.post("/Bulk", json={"schemas": [BULK], "Operations": ops}, timeout=300)
            assert answer.status_code == 200, answer.text[:500]

        list(idp.pool.map(deactivate, range(0, ATTACK_USERS, 1000)))
    wait_caught_up(admin, t, timeout=600, worker=worker)
    ended = purchases(admin, t)[-1]
    assert ended["status"] == "cancelled" and "no longer needed" in ended["error"]
    assert len(fake.calls) == calls_before_attack and len(fake.posts("/v1/subscriptions/")) == 1
    scim.client.close()
