"""License rules: access, role, lowest tier, seat demand and seat planning (DESIGN.md "Seats")."""

from __future__ import annotations

import itertools

import pytest

from billing.licenses import (
    TIERS,
    Entitlement,
    GroupMapping,
    TierPlan,
    entitlement,
    plan_tier,
    purchase_targets,
    role_for,
    tier_for,
)

MAPPING = GroupMapping.from_config(
    {
        "user_groups": ["g-users"],
        "admin_groups": ["g-admins"],
        "license_groups": {
            "starter": ["g-starter"],
            "team": ["g-team"],
            "enterprise": ["g-enterprise"],
        },
    }
)

SLOTS = ("user", "admin", "starter", "team", "enterprise")
GROUP_OF_SLOT = {
    "user": "g-users",
    "admin": "g-admins",
    "starter": "g-starter",
    "team": "g-team",
    "enterprise": "g-enterprise",
}


def _expected(active: bool, member_of: frozenset[str]) -> tuple[str | None, str | None]:
    """The help page's rules, spelled out slot by slot."""
    has_access = active and ("user" in member_of or "admin" in member_of)
    if not has_access:
        return None, None
    role = "admin" if "admin" in member_of else "user"
    if "starter" in member_of:
        tier = "starter"
    elif "team" in member_of:
        tier = "team"
    elif "enterprise" in member_of:
        tier = "enterprise"
    else:
        tier = None
    return role, tier


def _cases():
    for active in (True, False):
        for flags in itertools.product((False, True), repeat=len(SLOTS)):
            member_of = frozenset(slot for slot, on in zip(SLOTS, flags, strict=True) if on)
            label = ("active" if active else "inactive") + ":" + ("+".join(sorted(member_of)) or "none")
            yield pytest.param(active, member_of, *_expected(active, member_of), id=label)


ALL_CASES = list(_cases())


def test_the_table_covers_every_combination():
    """Given five slots and two activity states, Then the table has 2^5 x 2 distinct rows."""
    assert len(ALL_CASES) == 64
    assert len({case.id for case in ALL_CASES}) == 64


@pytest.mark.parametrize(
    ("active", "member_of", "role", "tier"),
    [
        # Spot checks of the expectation itself, written out by hand.
        (True, frozenset({"user", "enterprise", "team"}), "user", "team"),
        (True, frozenset({"admin", "user", "enterprise"}), "admin", "enterprise"),
        (True, frozenset({"starter", "team", "enterprise"}), None, None),
        (False, frozenset({"admin", "starter"}), None, None),
        (True, frozenset({"admin"}), "admin", None),
    ],
)
def test_expectation_spot_checks(active, member_of, role, tier):
    """Given a hand-written row, Then the table's expectation agrees with it."""
    assert _expected(active, member_of) == (role, tier)


@pytest.mark.parametrize(("active", "member_of", "role", "tier"), ALL_CASES)
def test_entitlement_for_every_membership_combination(active, member_of, role, tier):
    """Given a user's SCIM active flag and the mapped slots they are in,
    When their entitlement is computed,
    Then access needs active and a user/admin group, admin wins, the lowest tier wins,
    and a user without access holds no license.
    """
    group_ids = frozenset(GROUP_OF_SLOT[slot] for slot in member_of)

    result = entitlement(active, group_ids, MAPPING)

    assert result == Entitlement(role=role, tier=tier)
    assert role_for(active, group_ids, MAPPING) == role


@pytest.mark.parametrize(("active", "member_of", "role", "tier"), ALL_CASES)
def test_tier_alone_ignores_access(active, member_of, role, tier):
    """Given any membership, When only the tier is asked (access aside),
    Then it is the lowest tier among the license groups the user is in.
    """
    group_ids = frozenset(GROUP_OF_SLOT[slot] for slot in member_of)
    lowest = next((t for t in ("starter", "team", "enterprise") if t in member_of), None)

    assert tier_for(group_ids, MAPPING) == lowest


def test_several_groups_per_slot():
    """Given two groups in each slot, When a user is in any one of them, Then that slot applies."""
    mapping = GroupMapping.from_config(
        {
            "user_groups": ["u1", "u2"],
            "admin_groups": ["a1", "a2"],
            "license_groups": {"team": ["t1", "t2"], "enterprise": ["e1", "e2"]},
        }
    )

    assert entitlement(True, {"u2", "e1"}, mapping) == Entitlement("user", "enterprise")
    assert entitlement(True, {"a2", "u1", "t2", "e2"}, mapping) == Entitlement("admin", "team")
    assert entitlement(True, {"t1", "unmapped"}, mapping) == Entitlement(None, None)


def test_a_group_mapped_to_two_slots_counts_for_both():
    """Given one group that is both the user group and the team group,
    When a user is in it, Then they get access and the team tier.
    """
    mapping = GroupMapping.from_config({"user_groups": ["all"], "license_groups": {"team": ["all"]}})

    assert entitlement(True, {"all"}, mapping) == Entitlement("user", "team")


def test_empty_mapping_grants_nothing():
    """Given an empty config, When anyone is evaluated, Then nobody has access or a license."""
    mapping = GroupMapping.from_config({})

    assert mapping.license_groups == {tier: frozenset() for tier in TIERS}
    assert entitlement(True, {"g1", "g2"}, mapping) == Entitlement(None, None)
    assert tier_for({"g1"}, mapping) is None


def test_from_config_ignores_other_settings_and_nulls():
    """Given the full admin config (auto_invite, seat_cap, null slots),
    When it is turned into a mapping, Then only the group slots are read.
    """
    mapping = GroupMapping.from_config(
        {
            "user_groups": None,
            "admin_groups": ["a"],
            "license_groups": {"starter": None, "team": ["t"]},
            "auto_invite": True,
            "seat_cap": {"team": 5},
        }
    )

    assert mapping.user_groups == frozenset()
    assert mapping.admin_groups == frozenset({"a"})
    assert mapping.license_groups == {
        "starter": frozenset(),
        "team": frozenset({"t"}),
        "enterprise": frozenset(),
    }


def test_from_config_rejects_an_unknown_tier():
    """Given a license slot for a tier that does not exist, Then the mapping refuses it."""
    with pytest.raises(ValueError, match="platinum"):
        GroupMapping.from_config({"license_groups": {"platinum": ["g"]}})


def test_tiers_are_in_ascending_order():
    """The order of TIERS is the order "lowest wins" walks."""
    assert TIERS == ("starter", "team", "enterprise")


@pytest.mark.parametrize(
    ("purchased", "holders", "waiting", "cap", "expected"),
    [
        pytest.param(0, 0, 0, None, TierPlan(grant=0, target=0, over_cap=0), id="nothing"),
        pytest.param(5, 2, 0, None, TierPlan(grant=0, target=5, over_cap=0), id="nobody-waiting"),
        pytest.param(5, 2, 3, None, TierPlan(grant=3, target=5, over_cap=0), id="free-seats-cover-everyone"),
        pytest.param(5, 2, 6, None, TierPlan(grant=3, target=8, over_cap=0), id="buy-the-difference"),
        pytest.param(0, 0, 4, None, TierPlan(grant=0, target=4, over_cap=0), id="first-purchase"),
        pytest.param(10, 3, 2, None, TierPlan(grant=2, target=10, over_cap=0), id="never-reduce"),
        pytest.param(5, 2, 6, 6, TierPlan(grant=3, target=6, over_cap=2), id="cap-limits-purchase"),
        pytest.param(5, 2, 6, 4, TierPlan(grant=2, target=5, over_cap=4), id="cap-below-purchased"),
        pytest.param(3, 3, 2, 3, TierPlan(grant=0, target=3, over_cap=2), id="cap-reached"),
        pytest.param(2, 3, 4, 0, TierPlan(grant=0, target=2, over_cap=4), id="cap-zero-holders-keep-seats"),
        pytest.param(5, 5, 1, 3, TierPlan(grant=0, target=5, over_cap=1), id="holders-above-cap-keep-seats"),
        pytest.param(2, 4, 0, None, TierPlan(grant=0, target=4, over_cap=0), id="holders-over-purchased-buys-back-up"),
        pytest.param(2, 4, 3, None, TierPlan(grant=0, target=7, over_cap=0), id="holders-over-purchased-waiters-wait"),
        pytest.param(2, 4, 3, 5, TierPlan(grant=0, target=5, over_cap=2), id="holders-over-purchased-with-cap"),
    ],
)
def test_plan_tier(purchased, holders, waiting, cap, expected):
    """Given seats bought, holders, waiting users and a cap,
    When the tier is planned,
    Then free bought seats go to waiters within the cap, the target never drops below
    what was bought, and waiters past the cap are counted as over cap.
    """
    plan = plan_tier(purchased, holders, waiting, cap)

    assert plan == expected
    assert plan.grant + plan.over_cap <= waiting
    assert plan.target >= purchased


@pytest.mark.parametrize(
    "args",
    [(-1, 0, 0, None), (0, -1, 0, None), (0, 0, -1, None), (0, 0, 0, -1)],
)
def test_plan_tier_rejects_negative_counts(args):
    """Given a negative count, Then planning refuses it instead of computing nonsense."""
    with pytest.raises(ValueError):
        plan_tier(*args)


def test_purchase_targets_covers_every_tier_in_one_purchase():
    """Given two short tiers and one that needs nothing,
    When the purchase is planned, Then one set of absolute quantities covers all three.
    """
    purchased = {"starter": 3, "team": 1, "enterprise": 2}
    plans = {
        "starter": plan_tier(3, 3, 2, None),
        "team": plan_tier(1, 1, 0, None),
        "enterprise": plan_tier(2, 1, 4, None),
    }

    assert purchase_targets(purchased, plans) == {"starter": 5, "team": 1, "enterprise": 5}


def test_purchase_targets_none_when_nothing_is_short():
    """Given every tier covered by seats already bought, Then there is nothing to purchase."""
    purchased = {"starter": 3, "team": 0, "enterprise": 9}
    plans = {tier: plan_tier(purchased[tier], 0, 0, None) for tier in TIERS}

    assert purchase_targets(purchased, plans) is None


def test_purchase_targets_fills_in_missing_tiers():
    """Given plans and quantities for only some tiers,
    Then the answer still names all three, keeping what was bought (0 when absent).
    """
    assert purchase_targets({"team": 2}, {"starter": plan_tier(0, 0, 1, None)}) == {
        "starter": 1,
        "team": 2,
        "enterprise": 0,
    }


def test_purchase_targets_never_lowers():
    """Given a plan whose target is below what was bought (e.g. built from stale numbers),
    Then the purchase keeps the higher quantity.
    """
    purchased = {"starter": 9, "team": 0, "enterprise": 0}
    plans = {"starter": TierPlan(grant=0, target=4, over_cap=0), "team": TierPlan(grant=0, target=1, over_cap=0)}

    assert purchase_targets(purchased, plans) == {"starter": 9, "team": 1, "enterprise": 0}
