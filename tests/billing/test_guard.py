"""The spend guard's rule (issue 9): how many seats one purchase may add without the admin's approval."""

from __future__ import annotations

import pytest

from billing.guard import GuardPolicy, hold_reason

DEFAULT = GuardPolicy()
NONE = {"starter": 0, "team": 0, "enterprise": 0}


@pytest.mark.parametrize(
    ("current", "limit"),
    [(0, 10), (8, 10), (40, 10), (41, 11), (100, 25), (1000, 250), (1001, 251)],
)
def test_the_default_limit_is_the_larger_of_ten_seats_and_a_quarter(current, limit):
    """max(10 seats, 25 % of the seats bought), rounded up, per tier."""
    assert DEFAULT.limit(current, first=False) == limit


def test_growth_up_to_the_limit_goes_ahead_and_one_more_is_held():
    """Given 100 team seats, Then +25 is bought without asking and +26 waits for approval, naming the tier."""
    before = {**NONE, "team": 100}
    assert hold_reason(DEFAULT, before, {**before, "team": 125}, first=False) is None
    reason = hold_reason(DEFAULT, before, {**before, "team": 126}, first=False)
    assert reason == "Spend guard: team 100 → 126 adds 26 seats, more than the 25 allowed without approval."


def test_each_tier_is_judged_on_its_own():
    """One purchase covers every short tier; the tier over its limit holds the whole purchase, and says so."""
    before = {"starter": 100, "team": 4, "enterprise": 0}
    after = {"starter": 120, "team": 14, "enterprise": 11}
    reason = hold_reason(DEFAULT, before, after, first=False)
    assert reason is not None and "enterprise 0 → 11" in reason
    assert "starter" not in reason and "team" not in reason


def test_the_first_purchase_after_linking_covers_the_default_burst():
    """The first purchase (the IdP's first sync, whose groups the admin mapped) may add up to 10,000 seats
    per tier: bench/burst.py's default burst of 10,000 users is bought in one purchase; 10,001 is asked."""
    assert hold_reason(DEFAULT, NONE, {**NONE, "starter": 10_000}, first=True) is None
    assert hold_reason(DEFAULT, NONE, {"starter": 5000, "team": 3000, "enterprise": 2000}, first=True) is None
    assert hold_reason(DEFAULT, NONE, {**NONE, "starter": 10_001}, first=True) is not None
    assert hold_reason(DEFAULT, NONE, {**NONE, "starter": 100_000}, first=False) is not None


def test_a_disabled_guard_holds_nothing_but_a_tier_finance_lowered():
    """Switched off, the guard lets any growth through, except raising a tier finance lowered by hand."""
    off = GuardPolicy(enabled=False)
    assert hold_reason(off, NONE, {**NONE, "team": 100_000}, first=False) is None
    reason = hold_reason(off, {**NONE, "team": 5}, {**NONE, "team": 8}, first=False, lowered={"team": 5})
    assert reason is not None and "finance lowered team to 5 by hand" in reason


def test_a_purchase_that_raises_nothing_is_never_held():
    before = {"starter": 3, "team": 9, "enterprise": 1}
    assert hold_reason(GuardPolicy(min_seats=0, percent=0), before, before, first=False) is None


def test_custom_settings_of_the_tenant_apply():
    """min_seats 0 and percent 10: 50 seats may grow by 5."""
    policy = GuardPolicy(min_seats=0, percent=10)
    before = {**NONE, "starter": 50}
    assert hold_reason(policy, before, {**before, "starter": 55}, first=False) is None
    assert hold_reason(policy, before, {**before, "starter": 56}, first=False) is not None

