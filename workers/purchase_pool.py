"""The purchases queue on threads of its own, inside every worker process.

Stripe can stop answering (a blackhole) for minutes; each purchase job then
holds its thread for up to the gateway's longest call. If purchases shared the
worker's threads, a few such jobs would stall every tenant's reconcile and
invitations. `sally-scim worker` therefore consumes only the reconcile and
invitation queues on its `WORKER_THREADS`, and this middleware runs a second
Dramatiq worker for the purchases queue with `PURCHASE_THREADS` threads.
"""

from __future__ import annotations

import logging

from dramatiq import Worker
from dramatiq.middleware import Middleware

from workers.names import PURCHASE_QUEUE

log = logging.getLogger(__name__)

# Marks the inner worker, so that worker-level middleware (this one, the sweep)
# acts once per process, for the outer worker only.
INNER = "sally_purchase_worker"


def is_purchase_worker(worker: object) -> bool:
    return bool(getattr(worker, INNER, False))


class _PurchaseQueueWorker(Worker):
    """A second Worker in the process that takes its consumers straight from the broker's queues.

    Worker.start() registers a middleware on the broker that adds a consumer for
    each queue declared later; the main worker has already registered one, and a
    second of the same type makes Dramatiq warn. Every actor is declared before
    any worker boots (workers/broker.py sets the broker, then imports the actors),
    so the purchases queue and its delay queue exist by now: add their consumers
    here, as that middleware would, and start the threads.
    """

    def start(self) -> None:
        self.broker.emit_before("worker_boot", self)
        for queue_name in self.broker.get_declared_queues():
            self._add_consumer(queue_name)
        for queue_name in self.broker.get_declared_delay_queues():
            self._add_consumer(queue_name, delay=True)
        for _ in range(self.worker_threads):
            self._add_worker()
        self.broker.emit_after("worker_boot", self)


class PurchaseWorkerMiddleware(Middleware):
    """Starts and stops the purchases queue's own worker with the process's main worker."""

    def __init__(self, threads: int, shutdown_timeout_ms: int = 30_000) -> None:
        self.threads = threads
        self.shutdown_timeout_ms = shutdown_timeout_ms
        self._worker: Worker | None = None

    def after_worker_boot(self, broker, worker) -> None:
        if is_purchase_worker(worker) or self._worker is not None:
            return
        whitelist = getattr(worker, "consumer_whitelist", None)
        if not whitelist or PURCHASE_QUEUE in whitelist:
            # The main worker consumes purchases itself (no --queues): nothing to add.
            return
        inner = _PurchaseQueueWorker(broker, queues={PURCHASE_QUEUE}, worker_threads=self.threads)
        setattr(inner, INNER, True)
        inner.start()
        self._worker = inner
        log.info("purchases queue on %d thread(s) of its own", self.threads)

    def before_worker_shutdown(self, broker, worker) -> None:
        if is_purchase_worker(worker) or self._worker is None:
            return
        inner, self._worker = self._worker, None
        inner.stop(timeout=self.shutdown_timeout_ms)
