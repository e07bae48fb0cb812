"""What inspection reads on the server, never asking the interpreter: the snapshot a kernel's
trusted code sent with its last step, parsed with the server's own bounds, and a running step's
output as it arrives.

A snapshot (`inside/snapshot.py`) comes from inside the sandbox, so the episode can forge it: it
is parsed here from text of a bounded size into a bounded list of short strings and numbers,
whatever it holds. A running step's output (`LiveOutput`) keeps the tail of what was written, in
chunks with absolute offsets, so a watcher (the page's event stream) takes what is new since its
last read and learns when it fell behind.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any

SNAPSHOT_BYTES = 64 << 10  # text of one snapshot the server parses (the sandbox sends <= 48 KiB)
SNAPSHOT_ROWS = 200
FIELD_CHARS = 200
LIVE_KEEP_BYTES = 256 << 10  # a running step's output kept for watchers (its tail)
LIVE_DISPLAYS = 8  # rich outputs of a running step kept for watchers (the last ones)
LIVE_DISPLAY_BYTES = 1 << 20


def _text(value: Any) -> str | None:
    return value[:FIELD_CHARS] if type(value) is str else None


def parse_snapshot(data: Any) -> dict[str, Any] | None:
    """`{"variables": [{"name", "type", "repr", "len"?}], "total", "truncated"}` from the text a
    kernel sent, or None for anything else (too long, not JSON, not that shape)."""
    if type(data) is not str or len(data) > SNAPSHOT_BYTES:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if type(value) is not dict or type(value.get("variables")) is not list:
        return None
    rows = []
    for row in value["variables"][:SNAPSHOT_ROWS]:
        if type(row) is not dict:
            continue
        name, kind, short = _text(row.get("name")), _text(row.get("type")), _text(row.get("repr"))
        if name is None or kind is None or short is None:
            continue
        entry: dict[str, Any] = {"name": name, "type": kind, "repr": short}
        if type(row.get("len")) is int and 0 <= row["len"] < 1 << 62:
            entry["len"] = row["len"]
        rows.append(entry)
    total = value.get("total")
    total = total if type(total) is int and len(rows) <= total < 1 << 31 else len(rows)
    return {"variables": rows, "total": total, "truncated": total > len(rows)}


class LiveOutput:
    """A running step's output so far: text chunks (stdout, stderr) and rich displays, each with
    its offset in the step's output, the oldest dropped past `keep_bytes`. `version` grows with
    every change; `changed()` wakes watchers."""

    def __init__(self, keep_bytes: int = LIVE_KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self.chunks: deque[tuple[int, str, str]] = deque()  # (offset, stream, text)
        self.displays: deque[tuple[int, dict[str, Any]]] = deque()  # (offset, MIME bundle)
        self.kept = self.display_bytes = 0
        self.written = 0  # characters and displays of the step so far: the next offset
        self.version = 0
        self.running = False
        self.started = 0.0
        self._event = asyncio.Event()

    def begin(self) -> None:
        self.chunks.clear()
        self.displays.clear()
        self.kept = self.display_bytes = self.written = 0
        self.running, self.started = True, time.time()
        self._bump()

    def end(self) -> None:
        self.running = False
        self._bump()

    def write(self, stream: str, text: str) -> None:
        if not text or not self.running:
            return
        self.chunks.append((self.written, stream, text))
        self.written += len(text)
        self.kept += len(text)
        while self.kept > self.keep_bytes and len(self.chunks) > 1:
            self.kept -= len(self.chunks.popleft()[2])
        if self.kept > self.keep_bytes:  # one chunk larger than all we keep: its tail
            offset, name, only = self.chunks.pop()
            cut = only[-self.keep_bytes:]
            self.chunks.append((offset + len(only) - len(cut), name, cut))
            self.kept = len(cut)
        self._bump()

    def display(self, data: dict[str, Any], size: int) -> None:
        if not self.running or size > LIVE_DISPLAY_BYTES:
            return
        self.displays.append((self.written, data))
        self.written += 1
        self.display_bytes += size
        while len(self.displays) > LIVE_DISPLAYS or self.display_bytes > LIVE_DISPLAY_BYTES:
            _, dropped = self.displays.popleft()
            self.display_bytes -= sum(len(str(v)) for v in dropped.values())
        self._bump()

    def since(self, offset: int) -> tuple[list[dict[str, Any]], int, bool]:
        """(what was written from `offset` on, the next offset, whether some of it was dropped)."""
        items: list[tuple[int, dict[str, Any]]] = []
        first = self.written
        for start, name, text in self.chunks:
            first = min(first, start)
            if start + len(text) > offset:
                skip = max(0, offset - start)
                items.append((start + skip, {"stream": name, "text": text[skip:]}))
        for start, data in self.displays:
            first = min(first, start)
            if start >= offset:
                items.append((start, {"display": data}))
        items.sort(key=lambda item: item[0])
        return [item for _, item in items], self.written, offset < first

    def text(self) -> dict[str, str]:
        """What is kept of each stream, for a one-off look."""
        out = {"stdout": "", "stderr": ""}
        for _, name, text in self.chunks:
            out[name] = out.get(name, "") + text
        return out

    async def changed(self, version: int, timeout_s: float) -> None:
        """Return once `version` is old, or after `timeout_s`."""
        if self.version != version:
            return
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except TimeoutError:
            pass

    def _bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()
