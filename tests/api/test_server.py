"""The HTTP/1.1 protocol `sally-scim web` serves with (api/server.py): one socket write per response."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Iterator

import pytest
import uvicorn

from api.server import PROTOCOL, OneWriteTransport
from tests.fakes.ports import free_port


class RecordingTransport(asyncio.Transport):
    """What reached the socket: each write as one item."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1234)}.get(name, default)


def test_the_writes_of_one_loop_step_reach_the_socket_as_one_write_in_order():
    """Given a response's head and body written in one step of the event loop, then another response's
    When the loop runs on
    Then the socket got one write per step, the bytes in the order written; nothing is sent mid-step."""
    async def run() -> tuple[list[bytes], list[bytes]]:
        real = RecordingTransport()
        transport = OneWriteTransport(real, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n")
        transport.write(bytearray(b"{}"))
        during = list(real.sent)
        await asyncio.sleep(0)
        transport.writelines([b"HTTP/1.1 204 No Content\r\n\r\n", b""])
        await asyncio.sleep(0)
        return during, real.sent

    during, sent = asyncio.run(run())

    assert during == []
    assert sent == [b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}", b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_close_sends_what_is_pending_first_and_abort_drops_it():
    """Given a response written and the connection closed in the same step (Connection: close)
    Then the response reaches the socket before the close; after an abort nothing more is sent,
    and a write pending when the peer has gone is dropped, not written to a closed transport."""
    async def run() -> tuple[RecordingTransport, RecordingTransport, RecordingTransport]:
        loop = asyncio.get_running_loop()
        closed, aborted, gone = RecordingTransport(), RecordingTransport(), RecordingTransport()
        one = OneWriteTransport(closed, loop)
        one.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        one.close()
        two = OneWriteTransport(aborted, loop)
        two.write(b"partial")
        two.abort()
        three = OneWriteTransport(gone, loop)
        three.write(b"late")
        gone.closed = True  # connection_lost: the peer went away before the step ended
        await asyncio.sleep(0)
        return closed, aborted, gone

    closed, aborted, gone = asyncio.run(run())

    assert closed.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"] and closed.closed
    assert aborted.sent == [] and aborted.aborted
    assert gone.sent == []


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """201 with the request body echoed (read in however many chunks it came), or 204 on DELETE."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "DELETE":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test runner owns signals
        pass


@pytest.fixture
def server_port() -> Iterator[int]:
    port = free_port()
    server = _Server(uvicorn.Config(echo_app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                    http=PROTOCOL, loop="uvloop"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_pipelined_keep_alive_requests_each_get_their_whole_response_in_order(server_port):
    """Given three requests sent at once on one keep-alive connection (a POST with a 100 kB body, a DELETE,
    a POST that asks to close the connection)
    Then the client reads three whole responses in order (201 with its body echoed, 204 with none, 201),
    and then the server closes the connection (RFC 9112 §9.6)."""
    big = b"x" * 100_000
    requests = (
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
        + b"DELETE /b HTTP/1.1\r\nHost: t\r\n\r\n"
        + b"POST /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
    )
    with socket.create_connection(("127.0.0.1", server_port), timeout=10) as sock:
        sock.sendall(requests)
        received = read_until_closed(sock)

    first, rest = received.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 201 ") and b"content-length: 100000" in first
    assert rest[:100_000] == big
    second, rest = rest[100_000:].split(b"\r\n\r\n", 1)
    assert second.startswith(b"HTTP/1.1 204 ")
    third, body = rest.split(b"\r\n\r\n", 1)
    assert third.startswith(b"HTTP/1.1 201 ") and b"connection: close" in third.lower()
    assert body == b"hello"
