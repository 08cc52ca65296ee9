"""The broker's Redis client: bounded by Settings' timeouts, and a stalled Redis told to Dramatiq as a
lost connection (which it handles: acks tried again, consumers reconnecting), never a hang."""

from __future__ import annotations

import dataclasses
import time

import pytest
import redis
from dramatiq import Message
from dramatiq.brokers.redis import ConnectionClosed

from tests.fakes.silent_server import SilentServer
from workers.broker import make_broker
from workers.names import RECONCILE_QUEUE


@pytest.fixture
def stalled_broker(base_settings):
    silent = SilentServer()
    settings = dataclasses.replace(base_settings, redis_url=f"redis://127.0.0.1:{silent.port}/0",
                                   redis_socket_timeout=0.3, redis_connect_timeout=0.3)
    broker = make_broker(settings, settings.redis_url)
    try:
        yield broker
    finally:
        broker.client.close()
        silent.close()


def test_a_stalled_redis_is_a_lost_connection_to_dramatiq_after_the_read_timeout(stalled_broker):
    """Given Redis accepting and never answering, When the broker enqueues,
    Then it fails after about the read timeout (not redis-py's default retries, not forever),
    with an error that is both a redis TimeoutError and a redis ConnectionError."""
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError) as raised:
        stalled_broker.enqueue(Message(queue_name=RECONCILE_QUEUE, actor_name="reconcile_tenant",
                                       args=("t1",), kwargs={}, options={}))
    waited = time.monotonic() - started
    assert isinstance(raised.value, redis.TimeoutError)
    # Not a speed figure: one timeout (0.3 s) and no retry, rather than four or a hang.
    assert waited < 0.3 * 3, waited


def test_an_ack_that_times_out_is_one_dramatiq_retries(stalled_broker):
    """Given a consumer on a stalled Redis, When it acks a message,
    Then Dramatiq sees ConnectionClosed, the error on which its worker tries the ack again until Redis
    answers (a timeout would instead leave the message unacked until the worker restarts)."""
    consumer = stalled_broker.consume(RECONCILE_QUEUE, prefetch=1, timeout=100)
    message = Message(queue_name=RECONCILE_QUEUE, actor_name="reconcile_tenant", args=("t1",), kwargs={},
                      options={"redis_message_id": "m1"})
    with pytest.raises(ConnectionClosed):
        consumer.ack(message)
