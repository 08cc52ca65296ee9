"""How uvicorn serves the app: its httptools HTTP/1.1 protocol, with each response's writes sent as one.

uvicorn writes a response's status line and headers, then its body, as two
transport writes: two `send` calls and, with TCP_NODELAY, two segments for
the client to read, for every SCIM create. Writes made in one step of the
event loop (a response's head and body are) go to the socket as one here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# For uvicorn's `http=` (a string, so uvicorn's worker processes import it by name).
PROTOCOL = "api.server:OneWriteHttpToolsProtocol"


class OneWriteTransport:
    """A transport whose writes within one event-loop step are sent together, at the end of that step.

    Everything else is the wrapped transport's; `close` sends what is pending
    first, so a response written just before a close still goes out whole.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what was written since the last flush (dropped if the connection is already closing)."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, resume_reading, set_protocol, …: the socket's own.
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a OneWriteTransport: one socket write per response."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneWriteTransport(transport, self.loop))  # type: ignore[arg-type]
