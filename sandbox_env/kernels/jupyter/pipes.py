"""A forked program's pipes as streams, on whatever event loop the server runs.

asyncio's `connect_read_pipe`/`connect_write_pipe` take a file object. Under uvloop (what
uvicorn runs) the transport's handle closes the descriptor, then the file object closes it
again; between the two, another thread may have been given that number (a box's status pipe, a
client's socket), and the second close takes it from its owner. Here each descriptor is watched
with `add_reader`/`add_writer` and closed exactly once, by the object that owns it.
"""

from __future__ import annotations

import asyncio
import os

CHUNK = 1 << 16


class PipeReader:
    """Feeds `stream` from a pipe until its end (or `close`)."""

    def __init__(self, fd: int, limit: int = CHUNK) -> None:
        self.stream = asyncio.StreamReader(limit=limit)
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.stream.feed_data(data)
        else:
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._loop.remove_reader(fd)
            os.close(fd)
            self.stream.feed_eof()


class PipeWriter:
    """What `run_to_end` asks of a program's stdin: `write`, `drain`, `close`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._watching = False
        self._drained: asyncio.Future[None] | None = None
        self._error: OSError | None = None
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        self._buffer += data
        self._flush()

    async def drain(self) -> None:
        if self._buffer and self._fd >= 0 and self._error is None:
            self._drained = self._loop.create_future()
            await self._drained
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._watching:
                self._loop.remove_writer(fd)
                self._watching = False
            os.close(fd)
        self._wake()

    def _flush(self) -> None:
        while self._buffer and self._fd >= 0:
            try:
                written = os.write(self._fd, self._buffer[:CHUNK])
            except BlockingIOError:
                if not self._watching:
                    self._loop.add_writer(self._fd, self._flush)
                    self._watching = True
                return
            except OSError as exc:  # the program closed its stdin, or ended
                self._error = exc
                self._buffer.clear()
                break
            del self._buffer[:written]
        if self._watching and self._fd >= 0:
            self._loop.remove_writer(self._fd)
            self._watching = False
        self._wake()

    def _wake(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
