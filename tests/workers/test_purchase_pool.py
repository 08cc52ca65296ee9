"""The purchases queue's own threads (workers/purchase_pool.py), on Dramatiq's StubBroker."""

from __future__ import annotations

import logging
import threading

import dramatiq
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker

from workers.names import PURCHASE_QUEUE, RECONCILE_QUEUE
from workers.purchase_pool import PurchaseWorkerMiddleware, is_purchase_worker


def test_purchases_run_on_their_own_worker_without_dramatiq_warning_of_a_duplicate_middleware(caplog):
    """Given a broker with a purchases actor and a reconcile actor, and the purchase pool middleware,
    When the main worker starts on the reconcile queue only, Then Dramatiq logs no warning (it warned of a
    middleware "of the same type twice" when the second worker registered its own), a purchase message
    runs on a thread of the purchases worker and a reconcile message on the main worker's."""
    broker = StubBroker()
    broker.emit_after("process_boot")
    broker.add_middleware(PurchaseWorkerMiddleware(threads=1, shutdown_timeout_ms=5_000))
    ran: dict[str, str] = {}
    done = {"buy": threading.Event(), "reconcile": threading.Event()}

    @dramatiq.actor(broker=broker, queue_name=PURCHASE_QUEUE, actor_name="buy")
    def buy() -> None:
        ran["buy"] = threading.current_thread().name
        done["buy"].set()

    @dramatiq.actor(broker=broker, queue_name=RECONCILE_QUEUE, actor_name="reconcile")
    def reconcile() -> None:
        ran["reconcile"] = threading.current_thread().name
        done["reconcile"].set()

    def dramatiq_warnings() -> list[logging.LogRecord]:
        # Only Dramatiq's: other tests' background threads may log meanwhile.
        return [r for r in caplog.records if r.name.startswith("dramatiq") and r.levelno >= logging.WARNING]

    main = Worker(broker, queues={RECONCILE_QUEUE}, worker_threads=1, worker_timeout=50)
    with caplog.at_level(logging.WARNING, logger="dramatiq"):
        main.start()
    try:
        [inner] = [m._worker for m in broker.middleware if isinstance(m, PurchaseWorkerMiddleware)]
        assert inner is not None and is_purchase_worker(inner)
        assert not dramatiq_warnings(), caplog.text
        assert set(inner.consumers) == {PURCHASE_QUEUE, f"{PURCHASE_QUEUE}.DQ"}
        assert set(main.consumers) == {RECONCILE_QUEUE, f"{RECONCILE_QUEUE}.DQ"}

        buy.send()
        reconcile.send()
        # Events, not Worker.join(): join returns at once when a consumer has not fetched the message yet.
        assert done["buy"].wait(30) and done["reconcile"].wait(30), ran
        inner_threads = {t.name for t in inner.workers}
        assert ran["buy"] in inner_threads and ran["reconcile"] not in inner_threads
    finally:
        main.stop(timeout=5_000)
    assert not dramatiq_warnings(), caplog.text
