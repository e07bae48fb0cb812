"""Head + tail of one output stream, in bytes, with everything counted.

Output is counted in bytes (UTF-8), not lines, because a single line can be gigabytes. Memory use
is bounded by `keep_bytes` whatever the code prints; `total` keeps counting so the caller can stop
the step once it passes the hard limit. Decoding uses errors="replace", so invalid UTF-8 never
breaks a reply. The server's capture and the sandbox's supervisor share this one buffer, so both
cut output the same way.
"""

from __future__ import annotations

TRUNCATION_MARK = "\n... [{skipped} bytes truncated] ...\n"


def _trim_utf8_end(data: bytes) -> bytes:
    """Drop an incomplete multi-byte sequence at the end (a cut made mid-character)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if byte & 0x80 == 0:  # ASCII: the sequence is complete
            return data
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return data if back >= need else data[:-back]
    return data


def _trim_utf8_start(data: bytes) -> bytes:
    """Drop continuation bytes at the start (a cut made mid-character)."""
    start = 0
    while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:]


class BoundedOutput:
    """Head + tail byte buffer for one stream.

    The first `keep_bytes // 2` bytes are kept verbatim (head); after that only the last
    `keep_bytes - head` bytes (tail). `truncated` tells whether anything in between was lost.
    """

    __slots__ = ("_head", "_tail", "head_limit", "keep_bytes", "tail_limit", "total")

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = max(2, int(keep_bytes))
        self.head_limit = self.keep_bytes // 2
        self.tail_limit = self.keep_bytes - self.head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", errors="replace")
        if not data:
            return
        self.total += len(data)
        room = self.head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
            if not data:
                return
        if len(data) >= self.tail_limit:
            self._tail = bytearray(data[-self.tail_limit:])
        else:
            self._tail += data
            excess = len(self._tail) - self.tail_limit
            if excess > 0:
                del self._tail[:excess]

    @property
    def truncated(self) -> bool:
        return self.total > len(self._head) + len(self._tail)

    @property
    def skipped(self) -> int:
        return self.total - len(self._head) - len(self._tail)

    def getvalue(self) -> str:
        """The kept text; a marker with the number of skipped bytes sits between head and tail."""
        if not self.truncated:
            return bytes(self._head + self._tail).decode("utf-8", errors="replace")
        head = _trim_utf8_end(bytes(self._head)).decode("utf-8", errors="replace")
        tail = _trim_utf8_start(bytes(self._tail)).decode("utf-8", errors="replace")
        return head + TRUNCATION_MARK.format(skipped=self.skipped) + tail
