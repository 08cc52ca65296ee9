"""Wake-ups of one tenant batched on the event loop (api/app.py WakeBatcher)."""

from __future__ import annotations

import asyncio

from api.app import WakeBatcher


def test_concurrent_wake_ups_share_a_round_trip_and_none_joins_a_batch_already_sent():
    """Given a slow wake-up (one Redis round trip), when 20 writes of one tenant and one of another
    ask for it at once and 5 more arrive while the first is in flight, then tenant A is woken twice
    (the batch in flight, then one batch for the late five: they committed after it was sent),
    tenant B once, and every caller gets the answer of its own batch."""
    calls: list[str] = []

    async def wake_one(tenant_id: str) -> bool:
        calls.append(tenant_id)
        first_call = len(calls) == 1
        await asyncio.sleep(0.05)
        return first_call

    async def run() -> list[bool]:
        batcher = WakeBatcher(wake_one)
        first = [asyncio.ensure_future(batcher.wake("A")) for _ in range(20)]
        other = asyncio.ensure_future(batcher.wake("B"))
        await asyncio.sleep(0.01)
        late = [asyncio.ensure_future(batcher.wake("A")) for _ in range(5)]
        return [*await asyncio.gather(*first), *await asyncio.gather(*late), await other]

    answers = asyncio.run(run())
    assert sorted(calls) == ["A", "A", "B"]
    assert answers[:20] == [True] * 20 and answers[20:25] == [False] * 5
