"""The mapping preview rule (billing/preview.py): pure, no I/O.

DESIGN.md "What the product does" 3–4: access from user/admin groups (admin
wins), the lowest tier wins, seats bought = max(bought, demand within the cap),
never reduced; a ledger-only tenant is charged nothing.
"""

from __future__ import annotations

import pytest

from billing.licenses import GroupMapping
from billing.preview import Member, Price, format_money, preview_mapping

MAPPING = GroupMapping(
    user_groups={"g-users"},
    admin_groups={"g-admins"},
    license_groups={"starter": {"g-starter"}, "team": {"g-team"}, "enterprise": {"g-ent"}},
)
PRICES = {"starter": Price(1000, "usd"), "team": Price(2500, "usd"), "enterprise": Price(9900, "usd")}


def member(uid: str, *groups: str, active: bool = True, role=None, tier=None) -> Member:
    return Member(uid, active, frozenset(groups), role, tier)


def test_gains_and_losses_compare_the_accounts_now_with_the_proposed_mapping():
    """Given users with and without access now, When the proposed mapping is previewed,
    Then those it gives access gain, those it takes access from lose, the rest are unchanged."""
    members = [
        member("new", "g-users"),  # no account yet → gains
        member("stays", "g-users", role="user"),  # unchanged
        member("dropped", "g-other", role="user"),  # no mapped group any more → loses
        member("inactive", "g-users", active=False, role="user"),  # deactivated in the IdP → loses
        member("outsider", "g-other"),  # never had access, still none
    ]
    preview = preview_mapping(members, MAPPING, {}, None, {}, billed=False)
    assert [c.user_id for c in preview.gains] == ["new"]
    assert sorted(c.user_id for c in preview.loses) == ["dropped", "inactive"]
    assert preview.role_changes == [] and preview.tier_changes == []


def test_admin_wins_and_the_lowest_tier_wins():
    """Given a user in the user and admin groups and in the team and starter groups,
    Then the preview gives the admin role and the starter tier (seed FAQ 5.2)."""
    preview = preview_mapping(
        [member("u", "g-users", "g-admins", "g-team", "g-starter", role="user", tier="team")],
        MAPPING, {"starter": 5, "team": 5}, None, PRICES, billed=True,
    )
    [role_change] = preview.role_changes
    assert (role_change.role_before, role_change.role_after) == ("user", "admin")
    [tier_change] = preview.tier_changes
    assert (tier_change.tier_before, tier_change.tier_after) == ("team", "starter")
    assert preview.tiers["starter"].demand == 1 and preview.tiers["team"].demand == 0


def test_seats_to_buy_and_the_price_per_tier():
    """Given 3 starter and 2 enterprise users and 1 starter seat bought,
    When previewed for a billed tenant, Then 2 starter and 2 enterprise seats are to buy,
    priced at Stripe's unit amounts, totalled per currency."""
    members = [member(f"s{i}", "g-users", "g-starter") for i in range(3)]
    members += [member(f"e{i}", "g-users", "g-ent") for i in range(2)]
    preview = preview_mapping(members, MAPPING, {"starter": 1}, None, PRICES, billed=True)
    assert {t: (p.demand, p.purchased, p.to_buy) for t, p in preview.tiers.items()} == {
        "starter": (3, 1, 2), "team": (0, 0, 0), "enterprise": (2, 0, 2),
    }
    assert preview.tiers["starter"].cost == 2000
    assert preview.tiers["enterprise"].cost == 19800
    assert preview.totals == {"usd": 21800}
    assert sum(t.to_buy for t in preview.tiers.values()) == 4 and preview.unpriced == []


def test_seats_are_never_reduced_and_the_cap_stops_buying():
    """Given 10 team seats bought and 4 users, Then nothing is bought (seats are never reduced);
    Given a starter cap of 2 for 5 starter users, Then 2 are bought and 3 wait past the cap."""
    members = [member(f"t{i}", "g-users", "g-team") for i in range(4)]
    members += [member(f"s{i}", "g-users", "g-starter") for i in range(5)]
    preview = preview_mapping(members, MAPPING, {"team": 10}, {"starter": 2}, PRICES, billed=True)
    assert preview.tiers["team"].to_buy == 0 and preview.tiers["team"].cost is None
    assert (preview.tiers["starter"].to_buy, preview.tiers["starter"].over_cap) == (2, 3)
    assert preview.totals == {"usd": 2000}


def test_ledger_only_costs_nothing_and_unread_prices_are_named():
    """Given a ledger-only tenant, Then seats to buy carry no cost and no total;
    Given a billed tenant whose team price was not read yet, Then team is listed as unpriced."""
    members = [member("t", "g-users", "g-team")]
    ledger = preview_mapping(members, MAPPING, {}, None, PRICES, billed=False)
    assert ledger.tiers["team"].to_buy == 1 and ledger.tiers["team"].cost is None
    assert ledger.totals == {} and ledger.unpriced == []
    unread = preview_mapping(members, MAPPING, {}, None, {}, billed=True)
    assert unread.unpriced == ["team"] and unread.totals == {}


def test_no_access_means_no_seat_even_in_a_license_group():
    """Given a user in a license group but in no user or admin group, Then no seat is counted."""
    preview = preview_mapping([member("x", "g-team")], MAPPING, {}, None, PRICES, billed=True)
    assert preview.tiers["team"].demand == 0 and preview.gains == []


def test_bad_caps_are_refused():
    with pytest.raises(ValueError):
        preview_mapping([], MAPPING, {}, {"platinum": 1}, {}, billed=False)
    with pytest.raises(ValueError):
        preview_mapping([], MAPPING, {}, {"team": -1}, {}, billed=False)


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [(21800, "usd", "218.00 USD"), (5, "eur", "0.05 EUR"), (123456789, "usd", "1,234,567.89 USD"), (500, "jpy", "500 JPY")],
)
def test_money_is_shown_in_major_units(amount, currency, shown):
    assert format_money(amount, currency) == shown
