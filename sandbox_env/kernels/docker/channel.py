"""The channel to a container's supervisor: its attached stdin/stdout, taken over from docker-py
and handed to asyncio. Frames are length-prefixed JSON. Start-up sends three plain frames (the
program, its config, a key made for this container); every frame after that is authenticated
with the key (`inside.wire`), carries the id of the request it answers, and comes in sequence:
anything else raises `Anomaly`."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from sandbox_env.errors import KernelUnavailableError
from sandbox_env.inside import bundle
from sandbox_env.inside.wire import HEADER, KEY_SIZE, MAX_FRAME, TAG_SIZE, TO_SANDBOX, TO_SERVER, Anomaly, seal, unseal

logger = logging.getLogger(__name__)

RUNNER_MODULES = ("bundle", "wire", "bounded", "procs", "slate", "untrusted", "snapshot", "worker", "zygote", "recycle", "runner")
LARGE_FRAME = 256 << 10  # decoded and validated in a thread: the event loop stays free
STDERR_LINES = 5  # per container: what the supervisor itself printed (a crash), escaped and cut
STDERR_BYTES = 300


@functools.lru_cache(maxsize=1)
def runner_program() -> bytes:
    """What the bootstrap runs: the supervisor and everything it starts, as one program text."""
    return (bundle(*RUNNER_MODULES) + "from sandbox_env.inside.runner import main\nmain()\n").encode()


def raw_socket(sock: Any) -> socket.socket:
    """A plain socket for asyncio, taken over (not shared) from docker-py's hijacked connection."""
    raw = getattr(sock, "_sock", sock)
    if not isinstance(raw, socket.socket) or raw.__class__.__name__ == "SSLSocket":
        raise KernelUnavailableError("the docker backend needs a unix or plain TCP DOCKER_HOST")
    owned = socket.socket(raw.family, raw.type, fileno=raw.detach())
    owned.setblocking(False)
    return owned


class Channel:
    """One container's channel, from its start-up frames on. Once closed, every read and write
    raises ConnectionError, a request in flight included."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kernel_id: str) -> None:
        self._reader: asyncio.StreamReader | None = reader
        self._writer: asyncio.StreamWriter | None = writer
        self._kernel_id = kernel_id
        self._pending = bytearray()
        self._key = os.urandom(KEY_SIZE)
        self._sent = self._received = 0
        self.last_frame_size = 0
        self._stderr_lines = 0

    @classmethod
    async def open(cls, raw: socket.socket, kernel_id: str) -> Channel:
        reader, writer = await asyncio.open_connection(sock=raw)
        return cls(reader, writer, kernel_id)

    def at_eof(self) -> bool:
        return self._reader is None or self._reader.at_eof()

    def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()

    def send_start_up(self, config: dict[str, Any]) -> None:
        """Plain start-up frames (no episode code runs yet): the program, its config, the key."""
        self._send_plain(runner_program())
        self._send_plain(json.dumps(config).encode())
        self._send_plain(self._key)

    async def request(self, message: dict[str, Any],
                      progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Send one authenticated request; its reply must carry its id (and verify, in sequence).
        `progress` frames that come first (a step's output so far) go to `progress`."""
        if self._writer is None:
            raise ConnectionError("no channel to the sandbox")
        request_id = self._sent + 1  # 0 is the ready frame's
        self._writer.write(seal(self._key, TO_SANDBOX, self._sent, {**message, "id": request_id}))
        self._sent += 1
        await self._writer.drain()
        reply = await self.read_frame()
        while reply.get("op") == "progress" and reply.get("id") == request_id:
            if progress is not None:
                progress(reply)
            reply = await self.read_frame()
        if reply.get("op") == "anomaly":
            raise Anomaly(f"the supervisor rejected request {request_id}: {str(reply.get('why'))[:200]!r}")
        if reply.get("id") != request_id:
            raise Anomaly(f"a reply to request {reply.get('id')!r} came for request {request_id}")
        return reply

    def _send_plain(self, data: bytes) -> None:
        if self._writer is None:
            raise ConnectionError("no channel to the sandbox")
        self._writer.write(HEADER.pack(len(data)) + data)

    async def read_frame(self) -> dict[str, Any]:
        size = HEADER.unpack(await self._read_stdout(HEADER.size))[0]
        if size > MAX_FRAME:
            raise Anomaly(f"a frame of {size} bytes")
        mac, body = await self._read_stdout(TAG_SIZE), await self._read_stdout(size)
        self.last_frame_size = size
        if size > LARGE_FRAME:
            reply = await asyncio.to_thread(unseal, self._key, TO_SERVER, self._received, mac, body)
        else:
            reply = unseal(self._key, TO_SERVER, self._received, mac, body)
        self._received += 1
        return reply

    async def _read_stdout(self, n: int) -> bytes:
        """Bytes of the container's stdout, taken out of Docker's 8-byte-header multiplexing."""
        reader = self._reader
        if reader is None:
            raise ConnectionError("no channel to the sandbox")
        while len(self._pending) < n:
            header = await reader.readexactly(8)
            size = int.from_bytes(header[4:8], "big")
            data = await reader.readexactly(size)
            if header[0] == 1:
                self._pending += data
            else:
                self._log_stderr(data)
        chunk = bytes(self._pending[:n])
        del self._pending[:n]
        return chunk

    def _log_stderr(self, data: bytes) -> None:
        """Only the supervisor writes to the container's stderr (a crash): log a few lines of it,
        escaped (no line of the log can be forged) and cut."""
        if not data.strip() or self._stderr_lines > STDERR_LINES:
            return
        self._stderr_lines += 1
        if self._stderr_lines > STDERR_LINES:
            logger.warning("sandbox %s: further stderr is not logged", self._kernel_id[:12])
            return
        logger.warning("sandbox %s stderr: %r", self._kernel_id[:12], data[:STDERR_BYTES])
