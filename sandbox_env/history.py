"""An episode's step history, bounded in entries and in bytes.

The inspection API and the page show it, and a submit without code grades the code of the steps
that ran ok, in order. A step whose record alone passes the byte budget keeps the head of each
long text; older steps go first when the budget is full. Either way the history is then no longer
complete, and a submit must carry its code. `Records` keeps ended episodes' records a while, for
export. Imports only the standard library.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

MAX_ENTRIES = 100
_OVERHEAD = 64  # keys, numbers and punctuation of one record, roughly


def weight(value: Any) -> int:
    """Approximate size in bytes of a JSON-able value: texts dominate, everything else is small."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, dict):
        return sum(len(str(k)) + weight(v) for k, v in value.items()) + 2
    if isinstance(value, list | tuple):
        return sum(weight(v) for v in value) + 2
    return 8


def _cut(text: str, keep: int) -> str:
    if len(text) <= keep:
        return text
    return f"{text[:keep]}\n... [{len(text) - keep} characters not kept in the step history]"


def _shrink(entry: dict[str, Any], budget: int) -> dict[str, Any]:
    """The entry with its long texts cut to their heads and rich displays dropped."""
    keep = max(256, budget // 8)
    result = dict(entry.get("result") or {})
    for key in ("stdout", "stderr"):
        if isinstance(result.get(key), str):
            result[key] = _cut(result[key], keep)
    if isinstance(result.get("exception"), dict):
        exception = dict(result["exception"])
        for key in ("message", "traceback"):
            if isinstance(exception.get(key), str):
                exception[key] = _cut(exception[key], keep)
        result["exception"] = exception
    if result.get("displays"):
        result["displays"] = []
    return {**entry, "code": _cut(str(entry.get("code", "")), keep), "result": result, "trimmed": True}


class StepHistory:
    """Records of `{"step", "code", "result"}`, oldest first, within `budget_bytes`."""

    def __init__(self, budget_bytes: int, max_entries: int = MAX_ENTRIES) -> None:
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        self._entries: deque[tuple[dict[str, Any], int]] = deque()
        self.size = 0
        self.complete = True  # every step since the reset is here, uncut

    def append(self, entry: dict[str, Any]) -> None:
        size = weight(entry) + _OVERHEAD
        if size > self.budget_bytes:
            entry = _shrink(entry, self.budget_bytes)
            size = weight(entry) + _OVERHEAD
            self.complete = False
        self._entries.append((entry, size))
        self.size += size
        while len(self._entries) > 1 and (self.size > self.budget_bytes or len(self._entries) > self.max_entries):
            _, dropped = self._entries.popleft()
            self.size -= dropped
            self.complete = False

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0
        self.complete = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (entry for entry, _ in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._entries[index][0]


class Records:
    """Records of ended episodes (`Episode.record()`: their metadata and step history), kept for
    export for `ttl_s` after they end, within `budget_bytes` in all (the oldest go first)."""

    def __init__(self, ttl_s: float, budget_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.budget_bytes, self.clock = ttl_s, budget_bytes, clock
        self._items: deque[tuple[float, int, dict[str, Any]]] = deque()  # (ended, size, record)
        self.size = 0

    def add(self, record: dict[str, Any]) -> None:
        if not record.get("episode_id") or self.ttl_s <= 0:
            return
        size = weight(record) + _OVERHEAD
        if size > self.budget_bytes:
            return
        self._items.append((self.clock(), size, record))
        self.size += size
        self._expire()

    def find(self, key: str, owner: str | None) -> dict[str, Any] | None:
        """The latest record whose session_id or episode_id is `key`, of `owner` (None: anyone's)."""
        self._expire()
        for _, _, record in reversed(self._items):
            if (owner is None or record.get("owner") == owner) and key in (record.get("session_id"), record.get("episode_id")):
                found: dict[str, Any] = record
                return found
        return None

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        while self._items and (self._items[0][0] < horizon or self.size > self.budget_bytes):
            self.size -= self._items.popleft()[1]
