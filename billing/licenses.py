"""License rules: who gets access, which tier, and how many seats to buy.

Pure functions over plain values: no I/O, no database, no Stripe. The worker
feeds them the directory and the purchased quantities and acts on the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal

from models.settings import TIERS

Role = Literal["admin", "user"]


@dataclass(frozen=True)
class GroupMapping:
    """Which IdP groups grant access, admin rights and each license tier."""

    user_groups: frozenset[str] = frozenset()
    admin_groups: frozenset[str] = frozenset()
    license_groups: dict[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.license_groups) - set(TIERS)
        if unknown:
            raise ValueError(f"unknown license tier(s): {sorted(unknown)}")
        # Normalise so every tier is present and every slot is a frozenset,
        # whatever iterable the caller passed (frozen: bypass __setattr__).
        object.__setattr__(self, "user_groups", frozenset(self.user_groups))
        object.__setattr__(self, "admin_groups", frozenset(self.admin_groups))
        object.__setattr__(
            self,
            "license_groups",
            {tier: frozenset(self.license_groups.get(tier, ())) for tier in TIERS},
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GroupMapping:
        """Build a mapping from the admin API's SCIM config (missing or null slots are empty)."""
        # The stored config also carries auto_invite and seat_cap: not ours, ignored.
        license_groups = config.get("license_groups") or {}
        return cls(
            user_groups=frozenset(config.get("user_groups") or ()),
            admin_groups=frozenset(config.get("admin_groups") or ()),
            license_groups={
                tier: frozenset(groups or ()) for tier, groups in license_groups.items()
            },
        )


@dataclass(frozen=True)
class Entitlement:
    """What a user is entitled to: a role (None = no access) and a tier (None = no license)."""

    role: Role | None
    tier: str | None


@dataclass(frozen=True)
class TierPlan:
    """The decision for one tier: seats to hand out now, seats to own, users the cap keeps out."""

    grant: int
    target: int
    over_cap: int


def role_for(active: bool, group_ids: AbstractSet[str], mapping: GroupMapping) -> Role | None:
    """The user's role: "admin" wins over "user"; None without active=true and a mapped group."""
    if not active:
        return None
    if group_ids & mapping.admin_groups:
        return "admin"
    if group_ids & mapping.user_groups:
        return "user"
    return None


def tier_for(group_ids: AbstractSet[str], mapping: GroupMapping) -> str | None:
    """The lowest tier among the license groups the user is in; None if in none."""
    for tier in TIERS:
        if group_ids & mapping.license_groups[tier]:
            return tier
    return None


def entitlement(active: bool, group_ids: AbstractSet[str], mapping: GroupMapping) -> Entitlement:
    """Role and tier together; a user without access holds no license."""
    role = role_for(active, group_ids, mapping)
    # No access means no seat, even for a user still in a license group.
    tier = tier_for(group_ids, mapping) if role is not None else None
    return Entitlement(role=role, tier=tier)


def plan_tier(purchased: int, holders: int, waiting: int, cap: int | None) -> TierPlan:
    """Plan one tier: who of the waiting users gets a seat now, and how many seats to own.

    - ``purchased``: seats bought (the Stripe item quantity, possibly set by hand).
    - ``holders``: users who already hold a seat of this tier; they keep it,
      even when there are more of them than ``purchased`` or ``cap``.
    - ``waiting``: users entitled to this tier who hold no seat yet.
    - ``cap``: the tenant's optional ceiling on seats in use (None = no cap).

    ``target`` never falls below ``purchased`` (seats are never reduced) and
    only rises as far as the cap allows. ``grant`` hands out seats that are
    already bought and free, within the cap. ``over_cap`` counts waiting users
    the cap will never let in (at most ``waiting``); the remaining
    ``waiting - grant - over_cap`` users wait for the purchase of
    ``target - purchased`` seats.
    """
    for name, value in (("purchased", purchased), ("holders", holders), ("waiting", waiting)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if cap is not None and cap < 0:
        raise ValueError(f"cap must be >= 0 or None, got {cap}")

    demand = holders + waiting
    allowed = demand if cap is None else min(demand, cap)
    target = max(purchased, allowed)
    free_seats = purchased - holders  # negative when finance lowered the quantity by hand
    room_under_cap = allowed - holders  # negative when the cap was lowered below the holders
    grant = max(0, min(waiting, free_seats, room_under_cap))
    # Holders above the cap keep their seats, so they are not "over cap" waiters:
    # the count is bounded by the users actually waiting.
    over_cap = min(waiting, max(0, demand - allowed))
    return TierPlan(grant=grant, target=target, over_cap=over_cap)


def raised_to(current: Mapping[str, int], demand: Mapping[str, int]) -> dict[str, int]:
    """Every tier at max(current, demand): a purchase raises seats, never lowers them."""
    return {tier: max(current.get(tier, 0), demand.get(tier, 0)) for tier in TIERS}


def purchase_targets(purchased: Mapping[str, int], plans: Mapping[str, TierPlan]) -> dict[str, int] | None:
    """Absolute quantities for all tiers if any tier must grow, else None.

    One purchase covers every short tier; tiers that need nothing keep their
    current quantity (absolute targets make a late duplicate harmless).
    """
    targets = raised_to(purchased, {tier: plan.target for tier, plan in plans.items()})
    if all(targets[tier] == purchased.get(tier, 0) for tier in TIERS):
        return None
    return targets
