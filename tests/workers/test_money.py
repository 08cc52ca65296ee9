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
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import stripe
from sqlalchemy import select

from models.tables import Purchase, as_utc
from tests.conftest import connect_tenant
from tests.workers.support import (
    TIERS,
    Idp,
    SlowSmtp,
    WorkerProcess,
    licenses,
    metric,
    metrics,
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
    # Each decision is audited once (the refused ones change nothing, so write nothing).
    decisions = [(row["action"], row["detail"]) for row in admin.get(f"/tenants/{t}/audit").json()
                 if row["action"].startswith("purchase_")]
    assert decisions == [("purchase_cancelled", {"purchase_id": second["id"]}),
                         ("purchase_approved", {"purchase_id": held["id"]})]
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
# Issue 9 names a 100,000-user attack. Its cost is the /Bulk writes: on this project's shared 2-core
# machine they run at ~100 users/s with SQLite, and a full-size run on PostgreSQL took 14.5 minutes to
# create the users, hold the purchase and list them (load average 8-17 from other runs), and a run
# on a quiet machine passed end to end in 7 min 39 s: far past a suite's budget on either
# database. So both passes run
# the same attack with 10,000 users (the guard holds the same way: the tenant's first purchase is behind
# it), and SALLY_ATTACK_USERS=100000 runs the full size.
ATTACK_USERS = int(os.environ.get("SALLY_ATTACK_USERS") or 10_000)


def test_a_bulk_attack_of_many_users_stops_at_the_guard_without_a_stripe_call(admin, stack):
    """Given a billed tenant with 5 enterprise seats whose Enterprise group gives access, and whose first
    purchase (its first sync: 10 users) is behind it,
    When a holder of its SCIM token creates ATTACK_USERS users with /Bulk and puts them all in that group,
    Then the purchase for them is held as awaiting_approval and Stripe sees no call at all (not even a read);
    10 users hold the seats and the rest wait with the guard's reason.
    When the IdP takes them out of the group again, Then the held purchase ends as no longer needed:
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
    # New connections for the attack: the ones above idled past the server's keep-alive
    # while the pipeline caught up, and reusing one races the server closing it.
    with Idp(scim.tenant_url, scim.token, concurrency=4) as idp:
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
    users = users_by_id(admin, t, timeout=300)
    waiting = [u for u in users.values() if u["status"] == "pending_license"]
    assert len(waiting) == ATTACK_USERS
    assert waiting[0]["status_reason"].startswith("Waiting for the admin to approve")

    # The users go again: out of the group (Entra's remove-by-value, one PATCH per member chunk).
    with Idp(scim.tenant_url, scim.token, concurrency=4) as idp:
        def remove(start: int) -> None:
            body = {"schemas": [PATCH], "Operations": [{"op": "remove", "path": "members", "value": [
                {"value": uid} for uid in created[start:start + 1000]]}]}
            answer = idp.client.patch(f"/Groups/{group}", json=body, timeout=300)
            assert answer.status_code in (200, 204), answer.text[:500]

        list(idp.pool.map(remove, range(0, ATTACK_USERS, 1000)))
    wait_caught_up(admin, t, timeout=600, worker=worker)
    ended = purchases(admin, t)[-1]
    assert ended["status"] == "cancelled" and "no longer needed" in ended["error"]
    assert len(fake.calls) == calls_before_attack and len(fake.posts("/v1/subscriptions/")) == 1
    scim.client.close()


# Issue 9: "Stripe blackhole (no answer) for 5 min while bursts continue". What 5 minutes hold at
# the real STRIPE_TIMEOUT (20 s) and purchase lease (30 s): several timeouts per purchase, a worker
# dying in the middle of a call, its lease lapsing and the sweep sending the purchase again, other
# tenants' bursts reconciled and invited all along. The suite plays that story with Stripe timing out
# after 1 s and a 5 s lease, in well under a minute; SALLY_BLACKHOLE_SECONDS=300 plays it for that
# long with the real timeout and lease (a burst every 20 s, the worker killed half-way).
BLACKHOLE_SECONDS = float(os.environ.get("SALLY_BLACKHOLE_SECONDS") or 0)


def _leases(engine, tenant_ids: list[str]) -> dict[str, datetime | None]:
    """Each tenant's one purchase: its lease, or None while no worker is calling Stripe for it."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(Purchase.tenant_id, Purchase.lease_until).where(Purchase.tenant_id.in_(tenant_ids))).all()
    return {tenant_id: as_utc(lease) if lease else None for tenant_id, lease in rows}


def test_a_stripe_blackhole_never_stalls_reconcile_or_invitations(admin, live_server, base_settings, engine, tmp_path):
    """Given a worker with 2 reconcile/invitation threads and 2 purchase threads, and three billed tenants
    whose purchases go to a Stripe that accepts connections and never answers (a blackhole),
    When another tenant's IdP pushes bursts all along (auto-invite on), the billed tenants' IdPs too,
    and the worker is killed in the middle of a Stripe call and started again,
    Then every burst is reconciled and invited while Stripe is silent (purchases have threads of their
    own); each purchase times out several times and stays pending with the error shown; the killed
    worker's lease is not taken over before it lapses, after which the sweep sends the purchase again;
    and once Stripe answers each tenant is bought for exactly once (one update, one invoice).
    """
    full = BLACKHOLE_SECONDS > 0
    lease = 30.0 if full else 5.0
    extra = {"PURCHASE_THREADS": "2", "STRIPE_UPDATE_SPACING": "0", "SALLY_PURCHASE_LEASE": str(lease)}
    if not full:
        extra["STRIPE_TIMEOUT"] = "1"
    with stripe_fake() as fake, SlowSmtp() as smtp:
        worker = WorkerProcess(base_settings, tmp_path / "worker", fake, smtp, threads=2, extra_env=extra,
                               sweep_interval=10.0 if full else 1.0)
        worker.start()
        try:
            billed = []
            for n in range(3):
                fake.add_subscription(f"sub_bh{n}", customer=f"cus_bh{n}", items={"price_team": 1})
                scim = connect_tenant(admin, f"Billed {n}", stripe_customer_id=f"cus_bh{n}",
                                      stripe_subscription_id=f"sub_bh{n}")
                wait_seats_read(admin, scim.tenant_id, {"starter": 0, "team": 1, "enterprise": 0}, worker)
                billed.append(scim)
            billed_ids = [scim.tenant_id for scim in billed]
            free = connect_tenant(admin, "Ledger Only")
            with Idp(free.tenant_url, free.token) as idp:
                everyone = idp.create_group("Everyone")
            save_mapping(admin, free.tenant_id, user_groups=[everyone], auto_invite=True)
            invited = 0

            def burst(label: str) -> None:
                """A wave of 20 new users of the ledger-only tenant: reconciled and invited, Stripe or not."""
                nonlocal invited
                with Idp(free.tenant_url, free.token) as idp:
                    ids = idp.create_users({"user_name": f"{label}_{i}@free.example"} for i in range(20))
                    idp.add_memberships({everyone: ids})
                invited += 20
                wait_caught_up(admin, free.tenant_id, timeout=60, worker=worker)
                wait_until(lambda: len(smtp.messages) == invited, timeout=60,
                           what=f"the {invited} invitations of the bursts sent", worker=worker)

            fake.blackhole()
            started = time.monotonic()
            for scim in billed:
                with Idp(scim.tenant_url, scim.token) as idp:
                    team = idp.create_group("Team")
                    people(idp, "b", 3, team)
                save_mapping(admin, scim.tenant_id, user_groups=[team], license_groups={"team": [team]})
            wait_until(lambda: all(purchases(admin, t) for t in billed_ids), timeout=30,
                       what="the purchases planned", worker=worker)
            burst("w0")

            # The worker dies in the middle of a Stripe call: the purchase's lease stays behind it.
            calling = wait_until(lambda: {t: lease for t, lease in _leases(engine, billed_ids).items()
                                          if lease is not None and lease > datetime.now(timezone.utc)},
                                 timeout=60, what="a purchase in a Stripe call", worker=worker)
            if full:
                while time.monotonic() - started < BLACKHOLE_SECONDS / 2:
                    burst(f"w{invited // 20}")
                    time.sleep(20)
            worker.kill()
            left_behind = {t: lease for t, lease in _leases(engine, billed_ids).items() if lease is not None}
            assert left_behind, f"a lease left behind by the killed worker (seen calling: {calling})"
            unanswered_at_kill = fake.unanswered
            worker.start()
            burst(f"w{invited // 20}")
            for scim in billed:
                with Idp(scim.tenant_url, scim.token) as idp:
                    idp.create_users([{"user_name": "late@x.example"}])
            for t in billed_ids:
                wait_until(lambda t=t: (lambda sync: sync["events_applied"] == sync["events_total"])(
                    admin.get(f"/tenants/{t}/sync").json()), timeout=60,
                    what="the billed tenants' events reconciled", worker=worker)
            # Taken over only once its lease lapsed: a new lease starts no earlier than the old one ended.
            def taken_after_lapse() -> bool:
                now = _leases(engine, list(left_behind))
                return all(now[t] is not None and now[t] - timedelta(seconds=lease) >= old
                           for t, old in left_behind.items())

            wait_until(taken_after_lapse, timeout=lease + 60,
                       what="the dead worker's leases lapsed and taken by the new worker", worker=worker)
            wait_until(lambda: fake.unanswered > unanswered_at_kill, timeout=60,
                       what="the purchases sent to Stripe again after the restart", worker=worker)
            while full and time.monotonic() - started < BLACKHOLE_SECONDS:
                burst(f"w{invited // 20}")
                time.sleep(20)
            wait_until(lambda: all((purchases(admin, t)[0]["error"] or "").startswith("Transient")
                                   for t in billed_ids), timeout=60, what="the Stripe error shown", worker=worker)

            assert fake.in_blackhole
            assert fake.unanswered >= 2 * len(billed), "several Stripe timeouts"
            for t in billed_ids:
                [stuck] = purchases(admin, t)
                assert stuck["status"] == "pending"
            assert all(fake.quantities(f"sub_bh{n}") == {"price_team": 1} for n in range(3))
            assert len(smtp.messages) == invited, "every burst invited while Stripe was silent"

            fake.blackhole(False)
            for t in billed_ids:
                wait_caught_up(admin, t, timeout=120, worker=worker)
                [bought] = purchases(admin, t)
                assert bought["status"] == "succeeded"
            for n in range(3):
                assert fake.quantities(f"sub_bh{n}") == {"price_team": 3}
            assert len(fake.updates) == 3 and len(fake.invoices) == 3, "each bought exactly once"
            assert httpx.get(f"{live_server.url}/readyz").json()["status"] == "ready"
        finally:
            fake.blackhole(False)
            worker.kill()


def test_a_refused_stripe_key_is_an_operator_alert_not_a_tenant_block(admin, live_server, base_settings, tmp_path):
    """Given a worker whose STRIPE_API_KEY Stripe refuses (401),
    When a tenant is linked, Then the error is logged, counted (sally_stripe_calls_total{outcome="auth_error"})
    and shown by /readyz (still 200: SCIM keeps working), and the tenant is not blocked: its link stays
    unverified, not invalid. When a worker with a good key runs, Then the link is verified and the alert ends.
    """
    with stripe_fake() as fake:
        fake.add_subscription("sub_key", customer="cus_key", items={"price_team": 2})
        worker = WorkerProcess(base_settings, tmp_path / "bad", fake, extra_env={"STRIPE_API_KEY": "sk_test_revoked_1"})
        worker.start()
        try:
            scim = connect_tenant(admin, "Key", stripe_customer_id="cus_key", stripe_subscription_id="sub_key")
            t = scim.tenant_id

            def alerted():
                ready = httpx.get(f"{live_server.url}/readyz")
                return ready.status_code == 200 and ready.json()["stripe"]["ok"] is False and ready.json()

            ready = wait_until(alerted, timeout=30, what="the Stripe alert on /readyz", worker=worker)
            assert "HTTP 401" in ready["stripe"]["detail"] and "sk_test_revoked_1" not in ready["stripe"]["detail"]
            assert metric(metrics(live_server.url), "sally_stripe_calls_total", outcome="auth_error") >= 1
            assert "Stripe refused the API key" in worker.log()
            assert "sk_test_revoked_1" not in worker.log()
            billing = admin.get(f"/tenants/{t}/billing").json()
            assert billing["status"] == "unverified" and billing["detail"] is None
        finally:
            worker.kill()
        good = WorkerProcess(base_settings, tmp_path / "good", fake)
        good.start()
        try:
            # The sweep re-sends a seat read at most once a minute per tenant.
            wait_until(lambda: admin.get(f"/tenants/{t}/billing").json()["status"] == "verified", timeout=120,
                       what="the link verified with a good key", worker=good)
            wait_until(lambda: httpx.get(f"{live_server.url}/readyz").json()["stripe"]["ok"], timeout=30,
                       what="the alert over", worker=good)
        finally:
            good.kill()
        scim.client.close()


def test_without_a_webhook_secret_the_sweep_rereads_linked_subscriptions(admin, base_settings, tmp_path):
    """Given a worker without STRIPE_WEBHOOK_SECRET (no webhooks), re-reading every 1 s (the default is 15 min),
    and a billed tenant whose 4 users hold its 4 team seats,
    When finance lowers team to 2 by hand and no event is delivered,
    Then the periodic re-read finds it: 2 users go pending_license and nothing is bought back without approval.
    """
    with stripe_fake() as fake:
        fake.add_subscription("sub_poll", customer="cus_poll", items={"price_team": 4})
        worker = WorkerProcess(base_settings, tmp_path / "worker", fake, sweep_interval=0.5,
                               extra_env={"STRIPE_RESYNC_INTERVAL": "1"})
        worker.start()
        try:
            scim = connect_tenant(admin, "Polled", stripe_customer_id="cus_poll", stripe_subscription_id="sub_poll")
            t = scim.tenant_id
            wait_seats_read(admin, t, {"starter": 0, "team": 4, "enterprise": 0}, worker)
            with Idp(scim.tenant_url, scim.token) as idp:
                group = idp.create_group("Team")
                ids = people(idp, "p", 4, group)
            save_mapping(admin, t, user_groups=[group], license_groups={"team": [group]})
            wait_caught_up(admin, t, worker=worker)
            assert statuses(admin, t, ids) == {"active": 4}
            reads_before = len([c for c in fake.calls if c.method == "GET"])

            finance_sets(fake, "sub_poll", "price_team", 2)

            wait_until(lambda: statuses(admin, t, ids) == {"active": 2, "pending_license": 2}, timeout=60,
                       what="the lowered seats found by the periodic re-read", worker=worker)
            assert licenses(admin, t)["team"] == {"purchased": 2, "assigned": 2}
            assert len([c for c in fake.calls if c.method == "GET"]) > reads_before
            assert [p["status"] for p in purchases(admin, t)] == ["awaiting_approval"]
            assert not [p for p in fake.posts() if (p.idempotency_key or "").startswith("sally-")]
            scim.client.close()
        finally:
            worker.kill()
