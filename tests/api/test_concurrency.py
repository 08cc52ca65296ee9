"""Concurrent SCIM writes: nothing lost, uniqueness held (one row per member, one user per name)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx

from tests.api.helpers import (
    assert_scim_error,
    count_rows,
    create_group,
    create_users,
    events,
    member_ids,
    patch_body,
    scim_client,
    user_body,
)

PARALLEL = 16


def run_together(tenant, request: Callable[[httpx.Client, int], httpx.Response]) -> list[httpx.Response]:
    """Send PARALLEL requests at once, each from its own thread and its own connection."""
    barrier = threading.Barrier(PARALLEL)

    def one(index: int) -> httpx.Response:
        with scim_client(tenant.tenant_url, tenant.token) as client:
            barrier.wait(timeout=30)
            return request(client, index)

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return list(pool.map(one, range(PARALLEL)))


def test_parallel_member_adds_to_one_group_lose_none(tenant, clean_db):
    """Given 16 Users and one empty Group
    When 16 PATCHes, sent at the same time on 16 connections, each add a different member
    (RFC 7644 §3.5.2.1)
    Then every PATCH succeeds, a GET shows all 16 members, group_member holds 16 rows,
    and each PATCH left one sync event naming its member."""
    ids = create_users(tenant.client, PARALLEL)
    group = create_group(tenant.client, "Crowd")

    responses = run_together(
        tenant,
        lambda client, i: client.patch(
            f"/Groups/{group['id']}",
            json=patch_body({"op": "Add", "path": "members", "value": [{"$ref": None, "value": ids[i]}]}),
        ),
    )

    failed = [r.text for r in responses if r.status_code not in (200, 204)]
    assert failed == []
    assert member_ids(tenant.client, group["id"]) == set(ids)
    assert count_rows(clean_db, "group_member", "group_id = :g", g=group["id"]) == PARALLEL
    updates = [user_ids for kind, user_ids in events(clean_db, tenant.tenant_id) if kind == "group_updated"]
    assert sorted(user_id for user_ids in updates for user_id in user_ids) == sorted(ids)


def _case_variant(name: str, mask: int) -> str:
    """The mask's bits choose which letters are upper case."""
    out, bit = [], 0
    for char in name:
        if char.isalpha():
            out.append(char.upper() if mask >> bit & 1 else char)
            bit += 1
        else:
            out.append(char)
    return "".join(out)


def test_parallel_creates_of_one_user_name_in_different_cases_make_one_user(tenant, clean_db):
    """Given a tenant
    When 16 POSTs of the same userName, each in a different case, arrive at the same time
    Then exactly one gets 201, the fifteen others 409 uniqueness (RFC 7644 §3.3),
    one scim_user row exists, and one user_created event."""
    names = [_case_variant("racer@example.com", mask) for mask in range(PARALLEL)]
    assert len(set(names)) == PARALLEL

    responses = run_together(tenant, lambda client, i: client.post("/Users", json=user_body(names[i])))

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * (PARALLEL - 1), [r.text for r in responses]
    for response in responses:
        if response.status_code == 409:
            assert_scim_error(response, 409, "uniqueness")
    winner = next(r.json() for r in responses if r.status_code == 201)
    assert count_rows(clean_db, "scim_user", "tenant_id = :t", t=tenant.tenant_id) == 1
    assert events(clean_db, tenant.tenant_id) == [("user_created", [winner["id"]])]
    listed = tenant.client.get("/Users", params={"filter": 'userName eq "RACER@example.com"'}).json()
    assert [r["id"] for r in listed["Resources"]] == [winner["id"]]
