"""What saving a proposed group mapping would do: access gained and lost, tier changes, seats to buy, price.

Pure: plain values in, plain values out, no I/O. The admin page and
``POST …/scim/config/preview`` feed it the current directory, the accounts the
pipeline derived, the seats bought (with each tier's price as the worker last
read it from Stripe) and the proposed mapping. Nothing is bought or changed:
the same rules (``billing.licenses``) then run in the worker once the admin saves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from billing.licenses import GroupMapping, Role, entitlement, raised_to
from models.settings import TIERS


@dataclass(frozen=True)
class Member:
    """A directory user as the preview sees it: the IdP's facts and what the pipeline derived so far."""

    user_id: str
    active: bool  # SCIM active=true and not deleted by the IdP
    group_ids: frozenset[str]
    role: Role | None = None  # the account's role now (None = no access)
    tier: str | None = None  # the tier the user is entitled to now (held or awaited)


@dataclass(frozen=True)
class Price:
    """A tier's Stripe price as last read: unit_amount in minor units (None = unknown), currency."""

    unit_amount: int | None
    currency: str | None


@dataclass(frozen=True)
class Change:
    """One user whose access, role or tier the proposed mapping changes."""

    user_id: str
    role_before: Role | None
    role_after: Role | None
    tier_before: str | None
    tier_after: str | None


@dataclass(frozen=True)
class TierPreview:
    """Seats of one tier under the proposed mapping, and what buying the missing ones costs."""

    tier: str
    demand: int  # users who would hold or await a seat of this tier
    purchased: int  # seats bought now
    cap: int | None
    to_buy: int  # seats a Save would buy at once (never negative: seats are never reduced)
    over_cap: int  # users the cap would keep waiting
    unit_amount: int | None
    currency: str | None
    cost: int | None  # to_buy × unit_amount in minor units; None when ledger only or the price is unknown


@dataclass(frozen=True)
class Preview:
    """The whole answer: who changes, seats and price per tier, the total per currency."""

    gains: list[Change] = field(default_factory=list)
    loses: list[Change] = field(default_factory=list)
    role_changes: list[Change] = field(default_factory=list)
    tier_changes: list[Change] = field(default_factory=list)
    tiers: dict[str, TierPreview] = field(default_factory=dict)
    billed: bool = False
    # Minor units per currency of everything to buy; empty when nothing is bought or ledger only.
    totals: dict[str, int] = field(default_factory=dict)
    # Tiers with seats to buy whose price was not read from Stripe yet.
    unpriced: list[str] = field(default_factory=list)


def preview_mapping(
    members: Iterable[Member],
    mapping: GroupMapping,
    purchased: Mapping[str, int],
    caps: Mapping[str, int] | None,
    prices: Mapping[str, Price],
    *,
    billed: bool,
) -> Preview:
    """Compare each member's access now with what ``mapping`` gives, and price the seats it needs.

    Seats to buy per tier follow the worker's rule (billing/seats.py): the
    target is max(purchased, min(demand, cap)); a Save buys target − purchased.
    ``billed`` is false for a ledger-only tenant (no Stripe subscription or no
    key): seats are then recorded as ``not_billed`` and cost nothing here.
    """
    caps = caps or {}
    for tier, cap in caps.items():
        if tier not in TIERS:
            raise ValueError(f"unknown license tier in caps: {tier!r}")
        if cap < 0:
            raise ValueError(f"cap of {tier} must be >= 0, got {cap}")
    gains: list[Change] = []
    loses: list[Change] = []
    role_changes: list[Change] = []
    tier_changes: list[Change] = []
    demand = dict.fromkeys(TIERS, 0)
    for member in members:
        after = entitlement(member.active, member.group_ids, mapping)
        before_tier = member.tier if member.role is not None else None
        change = Change(member.user_id, member.role, after.role, before_tier, after.tier)
        if after.tier is not None:
            demand[after.tier] += 1
        if member.role is None and after.role is not None:
            gains.append(change)
        elif member.role is not None and after.role is None:
            loses.append(change)
        elif member.role is not None:
            if member.role != after.role:
                role_changes.append(change)
            if before_tier != after.tier:
                tier_changes.append(change)

    tiers: dict[str, TierPreview] = {}
    totals: dict[str, int] = {}
    unpriced: list[str] = []
    # The seats needed within the cap; a purchase raises each tier to max(bought, needed) (raised_to).
    needed = {tier: demand[tier] if caps.get(tier) is None else min(demand[tier], caps[tier]) for tier in TIERS}
    targets = raised_to(purchased, needed)
    for tier in TIERS:
        bought = int(purchased.get(tier, 0))
        cap = caps.get(tier)
        allowed = needed[tier]
        to_buy = targets[tier] - bought
        price = prices.get(tier)
        unit_amount = price.unit_amount if price else None
        currency = price.currency if price else None
        cost = None
        if billed and to_buy and unit_amount is not None and currency:
            cost = to_buy * unit_amount
            totals[currency] = totals.get(currency, 0) + cost
        elif billed and to_buy:
            unpriced.append(tier)
        tiers[tier] = TierPreview(
            tier=tier, demand=demand[tier], purchased=bought, cap=cap, to_buy=to_buy,
            over_cap=demand[tier] - allowed, unit_amount=unit_amount, currency=currency, cost=cost,
        )
    return Preview(
        gains=gains, loses=loses, role_changes=role_changes, tier_changes=tier_changes,
        tiers=tiers, billed=billed, totals=totals, unpriced=unpriced,
    )


def format_money(amount: int, currency: str) -> str:
    """Minor units as a readable amount: 12345, "usd" → "123.45 USD" (zero-decimal currencies kept whole)."""
    # Stripe's zero-decimal currencies (https://docs.stripe.com/currencies#zero-decimal).
    zero_decimal = {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf",
                    "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
    code = currency.upper()
    if currency.lower() in zero_decimal:
        return f"{amount:,} {code}"
    return f"{amount // 100:,}.{amount % 100:02d} {code}"
