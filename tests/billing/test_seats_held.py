"""seat_count.assigned: the seats held per tier, kept by the pipeline instead of counted per reconcile."""

from __future__ import annotations

from sqlalchemy import event, func, select
from sqlmodel import Session

from billing.gateway import LedgerGateway
from billing.seats import REASON_CAP, allocate
from models.db import session_scope
from models.directory.groups import create_group
from models.directory.users import create_user
from models.tables import Account, SeatCount, Tenant, utcnow
from tests.workers.support import make_group, make_user, settle_pipeline

PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def _held(engine, tenant_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """(seat_count.assigned, accounts actually holding a license) per tier."""
    with engine.connect() as conn:
        kept = {t: n for t, n in conn.execute(
            select(SeatCount.tier, SeatCount.assigned).where(SeatCount.tenant_id == tenant_id)) if n}
        counted = dict(conn.execute(
            select(Account.license, func.count()).where(Account.tenant_id == tenant_id, Account.license.is_not(None))
            .group_by(Account.license)).all())
    return kept, counted


def test_the_seats_held_follow_every_license_change(admin, tenant, engine):
    """Given users gaining, changing and losing tiers through group changes, deactivation and deletion,
    when each change is reconciled, then the kept count per tier equals the accounts holding that tier,
    and a freed seat goes to the next user waiting without a new purchase."""
    c = tenant.client
    ann, bob, cid, dan = (make_user(c, f"{n}@x.com") for n in ("ann", "bob", "cid", "dan"))
    users = make_group(c, "Users", [ann, bob, cid, dan])
    starter = make_group(c, "Starter", [ann, bob])
    team = make_group(c, "Team", [cid, dan])
    r = admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json={
        "user_groups": [users], "license_groups": {"starter": [starter], "team": [team]}})
    assert r.status_code == 200, r.text
    settle_pipeline(engine, tenant.tenant_id)
    assert _held(engine, tenant.tenant_id) == ({"starter": 2, "team": 2}, {"starter": 2, "team": 2})

    def patch(group: str, op: str, member: str) -> None:
        body = {"schemas": [PATCH], "Operations": [{"op": op, "path": "members", "value": [{"value": member}]}]}
        assert c.patch(f"/Groups/{group}", json=body).status_code in (200, 204)

    patch(starter, "remove", bob)  # bob: starter → no license (still has access)
    patch(team, "add", ann)  # ann: lowest tier stays starter: nothing changes
    settle_pipeline(engine, tenant.tenant_id)
    assert _held(engine, tenant.tenant_id) == ({"starter": 1, "team": 2}, {"starter": 1, "team": 2})

    assert c.patch(f"/Users/{cid}", json={"schemas": [PATCH], "Operations": [
        {"op": "replace", "path": "active", "value": False}]}).status_code == 200  # cid loses access
    assert c.delete(f"/Users/{dan}").status_code == 204  # dan deleted
    settle_pipeline(engine, tenant.tenant_id)
    assert _held(engine, tenant.tenant_id) == ({"starter": 1}, {"starter": 1})

    purchases = len(admin.get(f"/tenants/{tenant.tenant_id}/purchases").json())
    patch(team, "add", bob)  # bob takes one of the two team seats freed above: no purchase
    settle_pipeline(engine, tenant.tenant_id)
    assert _held(engine, tenant.tenant_id) == ({"starter": 1, "team": 1}, {"starter": 1, "team": 1})
    assert len(admin.get(f"/tenants/{tenant.tenant_id}/purchases").json()) == purchases


def test_allocating_again_rewrites_no_waiting_user_whose_reason_stands(admin, tenant, engine):
    """Given 1,200 users waiting behind a seat cap of 10 (each shown the cap as the reason),
    When the seats are allocated again with nothing changed (each reconcile does this),
    Then no account is read or written by id, 500 at a time: the cost does not grow with the waiting
    users on every pass (removing 97,000 users waiting behind the spend guard took minutes that way),
    and every waiting user still shows the cap.
    """
    with Session(engine) as session:
        users = [create_user(session, tenant.tenant_id, {"userName": f"w{i}@acme.example"}) for i in range(1200)]
        group = create_group(session, tenant.tenant_id, {"displayName": "Everyone"}, {u.id: "User" for u in users})
        session.commit()
        group_id = group.id
    saved = admin.put(f"/tenants/{tenant.tenant_id}/scim/config", json={
        "user_groups": [group_id], "license_groups": {"starter": [group_id]}, "seat_cap": {"starter": 10}})
    assert saved.status_code == 200, saved.text
    settle_pipeline(engine, tenant.tenant_id)
    reason = REASON_CAP.format(tier="starter", cap=10)
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(" ".join(statement.split()))

    with session_scope(engine) as session:
        tenant_row = session.get(Tenant, tenant.tenant_id)
        event.listen(engine, "before_cursor_execute", seen)
        try:
            result = allocate(session, tenant_row, utcnow(), gateway=LedgerGateway(), trigger="test")
        finally:
            event.remove(engine, "before_cursor_execute", seen)

    assert result.waiting == {"starter": 1190, "team": 0, "enterprise": 0}
    assert not [s for s in statements if "account.user_id IN" in s], statements
    assert not [s for s in statements if s.startswith("UPDATE account")], statements
    with engine.connect() as conn:
        shown = conn.execute(select(Account.status_reason, func.count()).where(
            Account.tenant_id == tenant.tenant_id, Account.license.is_(None)).group_by(Account.status_reason)).all()
    assert shown == [(reason, 1190)]
