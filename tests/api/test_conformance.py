"""scim2-tester against the live app: every check it derives from our discovery endpoints passes."""

from __future__ import annotations

from collections import Counter

import httpx2
from scim2_client.engines.httpx2 import SyncSCIMClient
from scim2_tester import Status, check_server

MIN_CHECKS = 130


def test_scim2_tester_runs_every_check_green(tenant):
    """Given a tenant's SCIM endpoint, when scim2-tester runs all its checks (it reads /Schemas
    and /ResourceTypes to decide what to test), then at least 130 run and every one succeeds."""
    with httpx2.Client(
        base_url=tenant.tenant_url, headers={"Authorization": f"Bearer {tenant.token}"}, timeout=30
    ) as http:
        results = check_server(SyncSCIMClient(http), raise_exceptions=False)
    failures = [f"{r.status.name} {r.title}: {r.reason}" for r in results if r.status != Status.SUCCESS]
    assert failures == []
    assert Counter(r.status for r in results)[Status.SUCCESS] >= MIN_CHECKS
