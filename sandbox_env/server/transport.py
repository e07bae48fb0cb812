"""uvicorn's HTTP protocol with a deadline on request headers (slowloris).

uvicorn closes a keep-alive connection that stays silent (`timeout_keep_alive`), but a client that
keeps sending half a header line, one byte at a time, holds its connection forever. Here the
headers of a request must arrive within `header_timeout_s` of its first byte (of the connection,
for the first request), and may not exceed `max_header_bytes`; either failure closes the
connection with 408 or 431. The body must then arrive within `body_timeout_s` of the headers, or
the connection is closed (a body trickled byte by byte would otherwise hold a connection slot:
each byte resets uvicorn's own timer). Request bodies are bounded by `BodySizeLimit` and
concurrency by uvicorn's `limit_concurrency`.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

STATUS_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
STATUS_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                    b"connection: close\r\n\r\n")


class _HeaderDeadline:
    """Mixin for uvicorn's httptools protocol, driven by the parser's own callbacks: a request
    head is open from the connection's start or the previous message's end until its headers
    are complete."""

    header_timeout_s: ClassVar[float] = 10.0
    max_header_bytes: ClassVar[int] = 64 << 10
    body_timeout_s: ClassVar[float] = 60.0

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._deadline: asyncio.TimerHandle | None = None
        self._head_open = True
        self._head_bytes = 0  # received while a head is open (heads that never end)
        self._head_size = 0  # parsed: request line and headers (heads that do end)
        self._head_too_large = False
        self._arm()  # a connection that sends nothing at all is also closed

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expire, STATUS_TIMEOUT)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, status: bytes) -> None:
        self._deadline = None
        if self._head_open and not self.transport.is_closing():
            self.transport.write(status)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._head_open:
            self._head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        # Still in a head after parsing all of it: the head alone is that long. (A chunk that
        # ends one message and starts the next counts from the next one's start, about.)
        if self._head_open and self._head_bytes > self.max_header_bytes:
            self._disarm()
            self._expire(STATUS_TOO_LARGE)

    def on_message_begin(self) -> None:
        self._head_open = True
        self._head_size = 0
        self._arm()  # from the first byte of a request (keep-alive waits are uvicorn's own timer)
        super().on_message_begin()  # type: ignore[misc]

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        super().on_header(name, value)  # type: ignore[misc]

    def _grow(self, size: int) -> None:
        """Exact head size, from the parser: raising here makes it a parse error (no request
        reaches the app), answered with 431 by `send_400_response` below."""
        self._head_size += size
        if self._head_size > self.max_header_bytes:
            self._head_too_large = True
            raise ValueError("request head too large")

    def send_400_response(self, msg: str) -> None:
        if getattr(self, "_head_too_large", False):
            self._disarm()
            self._expire(STATUS_TOO_LARGE)
            return
        super().send_400_response(msg)  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_bytes = 0
        self._disarm()
        # uvicorn's own test for handing the socket to a WebSocket (not any Upgrade: h2c, say)
        upgrade = self.parser.should_upgrade() and self._should_upgrade()  # type: ignore[attr-defined]
        super().on_headers_complete()  # type: ignore[misc]
        if not upgrade:  # a WebSocket's transport is the socket's from now on: no deadline on it
            self._deadline = self.loop.call_later(self.body_timeout_s, self._body_expired)

    def _body_expired(self) -> None:
        self._deadline = None
        if not self._head_open and not self.transport.is_closing():
            self.transport.close()  # the app may have answered already: no status line of ours

    def on_message_complete(self) -> None:
        self._disarm()  # the body is in: the app's own time is not bounded here
        self._head_open = True  # what comes next is the head of the next request
        self._head_bytes = 0
        super().on_message_complete()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]


def http_protocol(header_timeout_s: float, max_header_bytes: int,
                  body_timeout_s: float = 60.0) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol (what its "auto" picks) with the header deadline, for
    `uvicorn.Config(http=...)`; without httptools, h11, bounded by `h11_max_incomplete_event_size`
    only."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is in uvicorn[standard]
        return "h11"
    return type("SandboxHttpProtocol", (_HeaderDeadline, HttpToolsProtocol),
                {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes,
                 "body_timeout_s": body_timeout_s})
