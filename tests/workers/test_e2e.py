"""End to end: the IdP's burst through the live SCIM API, a real `sally-scim worker`, Stripe and SMTP.

DESIGN.md "What the product does" 3–7 and "Rules that keep it correct";
CONTRACT.md "Admin API" (what the admin sees) and "Stripe calls". Everything
runs for real: the live server in the test process, the worker as its own
process on the real broker (Redis, or the embedded one), the fake Stripe
server driven by the real `stripe` library inside the worker, and an
aiosmtpd mail server.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import stripe

from tests.conftest import connect_tenant
from tests.workers.support import (
    TIERS,
    UNIT_AMOUNTS,
    Idp,
    SlowSmtp,
    WorkerProcess,
    expected_message_id,
    intercept,
    licenses,
    metric,
    metrics,
    purchases,
    save_mapping,
    stripe_fake,
    subscription_posts,
    users_by_id,
    wait_caught_up,
    wait_seats_read,
)

N_USERS = 300
NO_ADDRESS = {7, 11, 13}
GROUPS = ("Users", "Admins", "Starter", "Team", "Enterprise", "Contractors")
TIER_GROUP = {"Starter": "starter", "Team": "team", "Enterprise": "enterprise"}
SLOW_READ = 5.0  # seconds Stripe takes to answer a subscription read, in the test that needs it


@pytest.fixture
def stack(admin, base_settings, tmp_path: Path) -> Iterator[tuple[Any, SlowSmtp, WorkerProcess]]:
    """Fake Stripe, a real SMTP server and one running worker; the worker's process group is killed after."""
    with stripe_fake() as fake, SlowSmtp() as smtp:
        worker = WorkerProcess(base_settings, tmp_path / "worker", fake, smtp)
        worker.start()
        try:
            yield fake, smtp, worker
        finally:
            worker.kill()


# -- the directory of the burst -------------------------------------------------------------


def groups_of(i: int) -> set[str]:
    """User i's IdP groups: most in Users, some admins (a few outside Users), overlapping license groups."""
    groups = set()
    if i % 10 != 9:
        groups.add("Users")
    if i % 15 == 0 or i % 50 == 29:
        groups.add("Admins")
    if i % 2 == 0:
        groups.add("Starter")
    if i % 3 == 0:
        groups.add("Team")
    if i % 5 == 0:
        groups.add("Enterprise")
    if i % 7 == 0:
        groups.add("Contractors")  # an IdP group nobody maps
    return groups


def expected_role(i: int) -> str | None:
    groups = groups_of(i)
    return "admin" if "Admins" in groups else "user" if "Users" in groups else None


def expected_tier(i: int) -> str | None:
    if expected_role(i) is None:
        return None
    for group in ("Starter", "Team", "Enterprise"):  # lowest tier first
        if group in groups_of(i):
            return TIER_GROUP[group]
    return None


def user_name(i: int) -> str:
    return f"noaddr{i:03d}" if i in NO_ADDRESS else f"u{i:03d}@corp.acme.example"


def user_spec(i: int) -> dict[str, Any]:
    work = {"value": f"user{i}@acme.example", "type": "work", "primary": True}
    if i in NO_ADDRESS or i % 4 == 3:
        emails: list[dict[str, Any]] = []
    elif i % 4 == 1:
        emails = [{"value": f"home{i}@home.example", "type": "home"}, work]
    else:
        emails = [work]
    return {"user_name": user_name(i), "emails": emails, "display_name": f"User {i}"}


def expected_address(i: int) -> str | None:
    """The primary email, else the first one, else userName when it is an address (CONTRACT.md)."""
    if i in NO_ADDRESS:
        return None
    return user_name(i) if i % 4 == 3 else f"user{i}@acme.example"


def demand() -> dict[str, int]:
    counts = dict.fromkeys(TIERS, 0)
    for i in range(N_USERS):
        if expected_tier(i):
            counts[expected_tier(i)] += 1
    return counts


# -- the tests ------------------------------------------------------------------------------


def test_a_burst_mapped_afterwards_is_bought_in_one_stripe_call_and_invited_once(admin, live_server, stack):
    """Given a tenant billed in Stripe (10 starter and 5 team seats bought, no enterprise item) and a
    running worker, and an IdP that pushes 300 users, 6 groups and their memberships in parallel,
    When the admin saves the mapping afterwards (with auto-invite on),
    Then every user has the right access (admin wins, lowest tier, nothing for license-only users),
    the seats are bought in ONE subscription update with absolute targets, billed at once and labelled
    for finance, every user who gained access gets exactly one invitation with the tenant/user
    Message-ID, a user with no address shows invite_error, and /metrics counts the jobs.
    Later, deprovisioning frees licenses but never lowers the seats, a reactivated user gets a free
    seat back and no second mail, and after a disconnect the users stay until removed by hand.
    """
    fake, smtp, worker = stack
    fake.add_subscription("sub_burst", customer="cus_burst", items={"price_starter": 10, "price_team": 5})
    scim = connect_tenant(admin, "Burst Inc", stripe_customer_id="cus_burst", stripe_subscription_id="sub_burst")
    t = scim.tenant_id
    wait_seats_read(admin, t, {"starter": 10, "team": 5, "enterprise": 0}, worker)
    at_start = metrics(live_server.url)

    # The IdP's first cycle: users, then groups, then members in PATCHes of 25, 8 connections.
    with Idp(scim.tenant_url, scim.token) as idp:
        ids = idp.create_users(user_spec(i) for i in range(N_USERS))
        group_ids = {name: idp.create_group(name) for name in GROUPS}
        idp.add_memberships({
            group_ids[name]: [ids[i] for i in range(N_USERS) if name in groups_of(i)] for name in GROUPS
        })
    index = {user_id: i for i, user_id in enumerate(ids)}
    wait_caught_up(admin, t, worker=worker)
    assert {u["status"] for u in users_by_id(admin, t).values()} == {"no_access"}, "nothing is mapped yet"
    assert subscription_posts(fake, "sub_burst") == [] and smtp.messages == []

    config = save_mapping(
        admin, t,
        user_groups=[group_ids["Users"]], admin_groups=[group_ids["Admins"]],
        license_groups={"starter": [group_ids["Starter"]], "team": [group_ids["Team"]],
                        "enterprise": [group_ids["Enterprise"]]},
        auto_invite=True,
    )
    assert config["auto_invite"] is True
    wait_caught_up(admin, t, timeout=60, worker=worker)

    # Access, role and license, as the admin sees them.
    users = users_by_id(admin, t)
    assert len(users) == N_USERS
    for user_id, user in users.items():
        i = index[user_id]
        role, tier = expected_role(i), expected_tier(i)
        assert (user["role"], user["license"], user["status"]) == (role, tier, "active" if role else "no_access"), (
            i, sorted(groups_of(i)), user)
    assert users[ids[29]]["role"] == "admin", "an admin outside the user group still gets access"
    assert users[ids[9]]["status"] == "no_access", "a user in a license group only has no access"
    assert (users[ids[30]]["role"], users[ids[30]]["license"]) == ("admin", "starter"), "admin wins, lowest tier"

    # The seats: one subscription update for the whole burst, absolute targets, billed at once.
    wanted = demand()
    assert all(wanted[tier] > bought for tier, bought in (("starter", 10), ("team", 5), ("enterprise", 0)))
    posts = subscription_posts(fake, "sub_burst")
    assert len(posts) == 1, [p.params for p in posts]
    ledger = purchases(admin, t)
    assert len(ledger) == 1
    purchase = ledger[0]
    assert purchase["status"] == "succeeded" and purchase["error"] is None
    assert purchase["quantities_before"] == {"starter": 10, "team": 5, "enterprise": 0}
    assert purchase["quantities_after"] == wanted
    post = posts[0]
    assert post.idempotency_key and purchase["id"] in post.idempotency_key
    assert post.params["proration_behavior"] == "always_invoice"
    assert post.params["payment_behavior"] == "error_if_incomplete"
    items = sorted((item.get("price") or item["id"], int(item["quantity"])) for item in post.params["items"])
    item_ids = {item["price"]["id"]: item["id"] for item in fake.subscription("sub_burst")["items"]["data"]}
    assert items == sorted([(item_ids["price_starter"], wanted["starter"]), (item_ids["price_team"], wanted["team"]),
                            ("price_enterprise", wanted["enterprise"])])
    metadata = post.params["metadata"]
    assert metadata["sally_tenant_id"] == t and metadata["sally_purchase_id"] == purchase["id"]
    assert metadata["sally_tiers"] == "starter,team,enterprise"
    assert metadata["sally_quantities_before"] == "starter=10,team=5,enterprise=0"
    assert metadata["sally_quantities_after"] == (
        f"starter={wanted['starter']},team={wanted['team']},enterprise={wanted['enterprise']}")
    assert "config_changed" in metadata["sally_trigger"]
    assert fake.quantities("sub_burst") == {
        "price_starter": wanted["starter"], "price_team": wanted["team"], "price_enterprise": wanted["enterprise"]}
    assert list(fake.invoices) == [purchase["stripe_invoice_id"]]
    invoice = fake.invoices[purchase["stripe_invoice_id"]]
    assert invoice["amount_due"] == sum(
        (wanted[tier] - before) * UNIT_AMOUNTS[f"price_{tier}"]
        for tier, before in (("starter", 10), ("team", 5), ("enterprise", 0)))
    assert invoice["metadata"]["sally_purchase_id"] == purchase["id"], "finance reads the invoice's metadata"
    assert licenses(admin, t) == {tier: {"purchased": wanted[tier], "assigned": wanted[tier]} for tier in TIERS}

    # Invitations: one per user who gained access, with the tenant/user Message-ID, to the right address.
    gained = [i for i in range(N_USERS) if expected_role(i)]
    addressed = [i for i in gained if expected_address(i)]
    sent = smtp.recipients()
    assert len(smtp.messages) == len(addressed) == len(sent), "one mail per user, no duplicate"
    assert sent == {expected_message_id(t, ids[i]): {expected_address(i)} for i in addressed}
    for i in range(N_USERS):
        user = users[ids[i]]
        if i in addressed:
            assert user["invited_at"] and user["invite_error"] is None, user
        elif i in gained:
            assert user["invited_at"] is None and "email address" in user["invite_error"], user
        else:
            assert user["invited_at"] is None and user["invite_error"] is None, user

    # /metrics: jobs by actor and outcome, Stripe calls, queue depth, requests by route and status.
    now = metrics(live_server.url)

    def grew(name: str, **labels: str) -> float:
        return metric(now, name, **labels) - metric(at_start, name, **labels)

    assert grew("sally_jobs_total", actor="purchase_seats", outcome="succeeded") == 1
    assert grew("sally_jobs_total", actor="send_invitation", outcome="sent") == len(addressed)
    assert grew("sally_jobs_total", actor="reconcile_tenant", outcome="ok") >= 2
    assert grew("sally_stripe_calls_total", outcome="ok") >= 1
    assert {dict(labels)["queue"] for name, labels in now if name == "sally_queue_depth"} == {
        "reconcile", "purchases", "invitations"}
    assert grew("sally_http_requests_total", method="POST", route="/scim/v2/{tenant_id}/Users", status="201") == N_USERS

    # Deprovisioning: deactivated (Entra's "False"), deleted, removed from a license group, from the user group.
    deactivated, deleted, unlicensed, removed, by_hand = ids[2], ids[3], ids[4], ids[5], ids[0]
    assert [expected_tier(i) for i in (2, 3, 4, 5, 0)] == ["starter", "team", "starter", "enterprise", "starter"]
    with Idp(scim.tenant_url, scim.token) as idp:
        idp.set_active(deactivated, False)
        idp.delete_user(deleted)
        idp.remove_member(group_ids["Starter"], unlicensed)
        idp.remove_member(group_ids["Users"], removed)
    wait_caught_up(admin, t, worker=worker)
    users = users_by_id(admin, t)
    assert (users[deactivated]["status"], users[deactivated]["active"], users[deactivated]["license"]) == (
        "no_access", False, None)
    assert (users[deleted]["status"], users[deleted]["license"]) == ("deleted", None)
    assert (users[unlicensed]["status"], users[unlicensed]["role"], users[unlicensed]["license"]) == (
        "active", "user", None)
    assert (users[removed]["status"], users[removed]["license"]) == ("no_access", None)
    freed = {"starter": 2, "team": 1, "enterprise": 1}
    assert licenses(admin, t) == {
        tier: {"purchased": wanted[tier], "assigned": wanted[tier] - freed[tier]} for tier in TIERS}
    assert len(subscription_posts(fake, "sub_burst")) == 1, "seats are never reduced"
    assert fake.quantities("sub_burst")["price_starter"] == wanted["starter"]

    # Reactivation: a free seat is handed back at once; no second invitation, no purchase.
    with Idp(scim.tenant_url, scim.token) as idp:
        idp.set_active(deactivated, True)
    wait_caught_up(admin, t, worker=worker)
    users = users_by_id(admin, t)
    assert (users[deactivated]["status"], users[deactivated]["license"]) == ("active", "starter")
    assert len(smtp.messages) == len(addressed), "reactivation sends no invitation"
    assert len(purchases(admin, t)) == 1 and len(subscription_posts(fake, "sub_burst")) == 1

    # Disconnect: the token stops working, everyone stays as they are.
    assert admin.delete(f"/tenants/{t}/scim").status_code == 204
    assert admin.get(f"/tenants/{t}/scim").json()["enabled"] is False
    revoked = httpx.get(f"{scim.tenant_url}/Users", headers={"Authorization": f"Bearer {scim.token}"})
    assert revoked.status_code == 401
    assert users_by_id(admin, t) == users
    # … until the admin removes one by hand: the license is freed, the seats stay bought.
    assert admin.delete(f"/tenants/{t}/users/{by_hand}").status_code == 204
    wait_caught_up(admin, t, worker=worker)
    after = users_by_id(admin, t)
    assert (after[by_hand]["status"], after[by_hand]["role"], after[by_hand]["license"]) == ("deleted", None, None)
    assert {uid: u for uid, u in after.items() if uid != by_hand} == {
        uid: u for uid, u in users.items() if uid != by_hand}
    assert licenses(admin, t)["starter"] == {"purchased": wanted["starter"], "assigned": wanted["starter"] - 2}
    assert len(subscription_posts(fake, "sub_burst")) == 1
    scim.client.close()


def test_a_declined_card_leaves_users_waiting_and_a_freed_seat_goes_to_them(admin, stack):
    """Given a tenant with 2 starter seats bought and a card that Stripe declines,
    When 4 users need starter seats,
    Then the purchase fails with Stripe's reason, 2 users get the seats already bought and 2 wait as
    pending_license showing the refusal; nothing is bought or invoiced and no new purchase is tried.
    When a licensed user is deleted, the freed seat goes to a waiting user.
    """
    fake, smtp, worker = stack
    fake.add_subscription("sub_decl", customer="cus_decl", items={"price_starter": 2})
    fake.decline_payments("cus_decl", "insufficient_funds")
    scim = connect_tenant(admin, "Declined", stripe_customer_id="cus_decl", stripe_subscription_id="sub_decl")
    t = scim.tenant_id
    wait_seats_read(admin, t, {"starter": 2, "team": 0, "enterprise": 0}, worker)
    with Idp(scim.tenant_url, scim.token) as idp:
        ids = idp.create_users({"user_name": f"d{i}@acme.example"} for i in range(4))
        staff = idp.create_group("Staff")
        idp.add_memberships({staff: ids})
    save_mapping(admin, t, user_groups=[staff], license_groups={"starter": [staff]}, auto_invite=True)
    wait_caught_up(admin, t, worker=worker)

    [purchase] = purchases(admin, t)
    assert purchase["status"] == "failed"
    assert "card_declined" in purchase["error"] and "insufficient_funds" in purchase["error"]
    assert purchase["quantities_before"]["starter"] == 2 and purchase["stripe_invoice_id"] is None
    users = users_by_id(admin, t)
    licensed = sorted(uid for uid, u in users.items() if u["license"] == "starter")
    waiting = sorted(uid for uid, u in users.items() if u["status"] == "pending_license")
    assert len(licensed) == 2 and len(waiting) == 2
    for uid in waiting:
        assert users[uid]["role"] == "user" and users[uid]["license"] is None
        assert users[uid]["status_reason"].startswith("Stripe refused the seat purchase")
        assert "insufficient_funds" in users[uid]["status_reason"]
    assert fake.updates == [] and fake.invoices == {}
    assert fake.quantities("sub_decl") == {"price_starter": 2}
    assert len(subscription_posts(fake, "sub_decl")) == 1, "a decline is final: no retry"
    assert len(smtp.messages) == 4, "pending_license users have access: they are invited too"

    with Idp(scim.tenant_url, scim.token) as idp:
        idp.delete_user(licensed[0])
    wait_caught_up(admin, t, worker=worker)
    users = users_by_id(admin, t)
    now_licensed = sorted(uid for uid, u in users.items() if u["license"] == "starter")
    still_waiting = [uid for uid, u in users.items() if u["status"] == "pending_license"]
    assert len(now_licensed) == 2 and licensed[1] in now_licensed
    assert len(still_waiting) == 1 and set(now_licensed) - {licensed[1]} <= set(waiting)
    assert licenses(admin, t)["starter"] == {"purchased": 2, "assigned": 2}
    assert len(purchases(admin, t)) == 1 and len(subscription_posts(fake, "sub_decl")) == 1
    scim.client.close()


def test_seat_cap_on_a_ledger_only_tenant(admin, stack):
    """Given a tenant with no Stripe subscription and a team seat cap of 4,
    When 6 users need team seats,
    Then a not_billed purchase records 4 seats (no Stripe call, no invoice), 2 users wait as pending_license
    with the cap as the reason. A newcomer waits behind them; when a licensed user is deactivated the
    freed seat goes to one of the users waiting longest, not to the newcomer. Raising the cap buys the rest.
    """
    fake, smtp, worker = stack
    scim = connect_tenant(admin, "Ledger Only")
    t = scim.tenant_id
    with Idp(scim.tenant_url, scim.token) as idp:
        ids = idp.create_users({"user_name": f"c{i}@acme.example"} for i in range(6))
        team = idp.create_group("Team")
        idp.add_memberships({team: ids})
        save_mapping(admin, t, user_groups=[team], license_groups={"team": [team]}, seat_cap={"team": 4})
        wait_caught_up(admin, t, worker=worker)

        [purchase] = purchases(admin, t)
        assert purchase["status"] == "not_billed" and purchase["stripe_invoice_id"] is None
        assert purchase["quantities_before"] == {"starter": 0, "team": 0, "enterprise": 0}
        assert purchase["quantities_after"] == {"starter": 0, "team": 4, "enterprise": 0}
        users = users_by_id(admin, t)
        first_waiters = sorted(uid for uid, u in users.items() if u["status"] == "pending_license")
        assert len(first_waiters) == 2
        for uid in first_waiters:
            assert users[uid]["status_reason"] == "The team seat cap (4) is reached; the admin can raise it."
        assert licenses(admin, t)["team"] == {"purchased": 4, "assigned": 4}

        newcomer = idp.create_user("late@acme.example")
        idp.add_memberships({team: [newcomer]})
        wait_caught_up(admin, t, worker=worker)
        assert users_by_id(admin, t)[newcomer]["status"] == "pending_license"

        holder = next(uid for uid, u in users.items() if u["license"] == "team")
        idp.set_active(holder, False)
        wait_caught_up(admin, t, worker=worker)
        users = users_by_id(admin, t)
        assert users[holder]["status"] == "no_access"
        assert users[newcomer]["status"] == "pending_license", "the longest waiting go first"
        assert sorted(users[uid]["status"] for uid in first_waiters) == ["active", "pending_license"]
        assert licenses(admin, t)["team"] == {"purchased": 4, "assigned": 4}
        assert len(purchases(admin, t)) == 1

        save_mapping(admin, t, user_groups=[team], license_groups={"team": [team]}, seat_cap={"team": 10})
        wait_caught_up(admin, t, worker=worker)
    users = users_by_id(admin, t)
    assert {u["status"] for uid, u in users.items() if uid != holder} == {"active"}
    ledger = purchases(admin, t)
    assert [p["status"] for p in ledger] == ["not_billed", "not_billed"]
    assert ledger[1]["quantities_after"] == {"starter": 0, "team": 6, "enterprise": 0}
    assert licenses(admin, t)["team"] == {"purchased": 6, "assigned": 6}
    assert fake.calls == [] and smtp.messages == [], "no Stripe call; auto-invite is off"
    scim.client.close()


def test_a_purchase_never_raises_again_what_finance_lowered_by_hand(admin, stack):
    """Given a billed tenant whose seats were read (2 starter, 10 team) and finance then lowering team
    to 5 by hand in Stripe (no team seat is in use),
    When 3 users need starter seats,
    Then the purchase raises starter to 3 and leaves team at the 5 finance set: target = max(current, demand).
    """
    fake, smtp, worker = stack
    fake.add_subscription("sub_fin", customer="cus_fin", items={"price_starter": 2, "price_team": 10})
    scim = connect_tenant(admin, "Finance", stripe_customer_id="cus_fin", stripe_subscription_id="sub_fin")
    t = scim.tenant_id
    wait_seats_read(admin, t, {"starter": 2, "team": 10, "enterprise": 0}, worker)
    team_item = next(i["id"] for i in fake.subscription("sub_fin")["items"]["data"] if i["price"]["id"] == "price_team")
    finance = stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url}, max_network_retries=0)
    finance.v1.subscriptions.update("sub_fin", params={"items": [{"id": team_item, "quantity": 5}]})
    with Idp(scim.tenant_url, scim.token) as idp:
        ids = idp.create_users({"user_name": f"f{i}@acme.example"} for i in range(3))
        group = idp.create_group("Starter")
        idp.add_memberships({group: ids})
    save_mapping(admin, t, user_groups=[group], license_groups={"starter": [group]})
    wait_caught_up(admin, t, worker=worker)

    [purchase] = purchases(admin, t)
    assert purchase["status"] == "succeeded"
    assert purchase["quantities_before"] == {"starter": 2, "team": 5, "enterprise": 0}
    assert purchase["quantities_after"] == {"starter": 3, "team": 5, "enterprise": 0}
    assert fake.quantities("sub_fin") == {"price_starter": 3, "price_team": 5}
    assert licenses(admin, t)["team"] == {"purchased": 5, "assigned": 0}
    scim.client.close()


def test_sync_is_not_caught_up_while_the_seats_bought_are_still_being_read(admin, stack):
    """Given a tenant just linked to Stripe whose subscription takes a few seconds to read,
    When users are mapped and the admin waits for …/sync to say caught up,
    Then no user is left waiting for a seat read (CONTRACT.md: what an applied event makes necessary
    is counted in pending_* in that commit).
    """
    fake, smtp, worker = stack
    fake.add_subscription("sub_slow", customer="cus_slow", items={"price_team": 1})

    def slow_read(method: str, path: str, response):
        if path == "/v1/subscriptions/sub_slow" and method == "GET":
            time.sleep(SLOW_READ)  # Stripe has done the work; the answer comes late
        return response

    intercept(fake, slow_read)
    scim = connect_tenant(admin, "Slow Read", stripe_customer_id="cus_slow", stripe_subscription_id="sub_slow")
    t = scim.tenant_id
    with Idp(scim.tenant_url, scim.token) as idp:
        ids = idp.create_users({"user_name": f"s{i}@acme.example"} for i in range(3))
        team = idp.create_group("Team")
        idp.add_memberships({team: ids})
    save_mapping(admin, t, user_groups=[team], license_groups={"team": [team]})
    wait_caught_up(admin, t, worker=worker)
    seen = {(u["status"], u["status_reason"]) for u in users_by_id(admin, t).values()}
    assert seen == {("active", None)}
