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
        # Dramatiq logs "adding a middleware of the same type twice" here: each Worker
        # registers its own consumer-adding middleware, which is what two workers need.
        inner = Worker(broker, queues={PURCHASE_QUEUE}, worker_threads=self.threads)
        setattr(inner, INNER, True)
        inner.start()
        self._worker = inner
        log.info("purchases queue on %d thread(s) of its own", self.threads)

    def before_worker_shutdown(self, broker, worker) -> None:
        if is_purchase_worker(worker) or self._worker is None:
            return
        inner, self._worker = self._worker, None
        inner.stop(timeout=self.shutdown_timeout_ms)
