"""Dead letters: a job that fails its last retry is listed by `sally-scim jobs failed` (actor, args,
when, error) and counted on /metrics; `sally-scim jobs retry` re-queues it with fresh retries."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

import dramatiq
import pytest
from dramatiq import Worker

from api.cli import build_parser
from api.metrics import PipelineCollector
from workers.broker import make_broker
from workers.deadletters import DeadLetters, FailureRecorder
from workers.telemetry import queue_counts


class LedgerDownError(Exception):
    """A failure with a reason that is safe to show (as our billing errors carry)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"secret-bearing text {reason}")
        self.reason = reason


@pytest.fixture
def failing_pipeline(base_settings, redis_client):
    """A real Redis broker in a namespace of its own, a real worker, and one actor that fails
    until told otherwise (max_retries=1, a few ms of backoff)."""
    settings = dataclasses.replace(base_settings, redis_namespace=f"{base_settings.redis_namespace}dl{uuid.uuid4().hex[:4]}")
    broker = make_broker(settings, settings.redis_url)
    broker.add_middleware(FailureRecorder(redis_client, settings.redis_namespace))
    state = {"failing": True, "done": []}

    @dramatiq.actor(actor_name="reconcile_tenant", queue_name="reconcile", broker=broker,
                    max_retries=1, min_backoff=10, max_backoff=20)
    def reconcile_tenant(tenant_id: str) -> None:
        if state["failing"]:
            raise LedgerDownError("the ledger is down")
        state["done"].append(tenant_id)

    worker = Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    try:
        yield settings, broker, reconcile_tenant, state
    finally:
        worker.stop()
        broker.flush_all()
        for key in redis_client.scan_iter(f"{settings.redis_namespace}*"):
            redis_client.delete(key)


def _wait(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.05)
    return found


def _cli(settings, capsys, *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(list(argv))
    code = args.func(settings, args)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_job_failing_its_last_retry_is_listed_counted_and_retried(failing_pipeline, redis_client, capsys):
    """Given an actor failing every attempt
    When its job has used its retries
    Then `jobs failed` lists it with actor, args, failed time and the safe reason of the last error,
    /metrics counts one dead letter on its queue; and once the fault is gone
    `jobs retry ID` re-queues it, the job runs, and nothing is left dead."""
    settings, broker, actor, state = failing_pipeline
    actor.send("tenant-1")
    letters = DeadLetters(broker, redis_client, settings.redis_namespace, ("reconcile",))
    dead = _wait(letters.list, "the dead letter")
    assert len(dead) == 1
    assert (dead[0].actor, dead[0].args, dead[0].queue) == ("reconcile_tenant", ("tenant-1",), "reconcile")
    assert dead[0].error == "LedgerDownError: the ledger is down"
    assert abs(time.time() - dead[0].failed_at.timestamp()) < 60

    code, out, _ = _cli(settings, capsys, "jobs", "failed", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [(j["id"], j["actor"], j["args"], j["error"]) for j in listed] == [
        (dead[0].id, "reconcile_tenant", ["tenant-1"], "LedgerDownError: the ledger is down")]
    assert "secret-bearing" not in out

    assert queue_counts(redis_client, broker.namespace, ("reconcile",))["dead"] == {"reconcile": 1}
    counts = queue_counts(redis_client, broker.namespace, ("reconcile",))
    snapshot = {"jobs": {}, "stripe": {}, "queues": counts["waiting"], "delayed": counts["delayed"], "dead": counts["dead"]}
    families = {family.name: family for family in PipelineCollector(lambda: snapshot).collect()}
    assert [(s.labels, s.value) for s in families["sally_queue_dead_letters"].samples] == [({"queue": "reconcile"}, 1)]
    assert "sally_queue_delayed" in families

    state["failing"] = False
    code, out, _ = _cli(settings, capsys, "jobs", "retry", dead[0].id)
    assert code == 0 and "re-queued 1" in out
    _wait(lambda: state["done"] == ["tenant-1"], "the retried job to run")
    assert letters.list() == []
    assert queue_counts(redis_client, broker.namespace, ("reconcile",))["dead"] == {"reconcile": 0}
    code, out, _ = _cli(settings, capsys, "jobs", "failed")
    assert code == 0 and "no failed jobs" in out


def test_retry_all_requeues_every_dead_letter_and_unknown_ids_are_reported(failing_pipeline, redis_client, capsys):
    """Given three dead letters, When `jobs retry --all` runs after the fault is fixed, Then all three run once;
    `jobs retry` with an unknown id says so and exits 1; with neither ids nor --all it refuses (2)."""
    settings, broker, actor, state = failing_pipeline
    for tenant in ("a", "b", "c"):
        actor.send(tenant)
    letters = DeadLetters(broker, redis_client, settings.redis_namespace, ("reconcile",))
    _wait(lambda: len(letters.list()) == 3, "three dead letters")
    state["failing"] = False
    code, out, _ = _cli(settings, capsys, "jobs", "retry", "--all")
    assert code == 0 and "re-queued 3" in out
    _wait(lambda: sorted(state["done"]) == ["a", "b", "c"], "the three retried jobs")
    code, _, err = _cli(settings, capsys, "jobs", "retry", "no-such-id")
    assert code == 1 and "no-such-id" in err
    code, _, _ = _cli(settings, capsys, "jobs", "retry")
    assert code == 2
