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


def _utf8(text: str) -> int:
    """The length of `text` in UTF-8 bytes (a lone surrogate as the 3 bytes it would take)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def weight(value: Any) -> int:
    """Approximate size in bytes of a JSON-able value (texts in UTF-8): texts dominate, everything
    else is small."""
    if isinstance(value, str):
        return _utf8(value) + 2
    if isinstance(value, dict):
        return sum(_utf8(str(k)) + weight(v) for k, v in value.items()) + 2
    if isinstance(value, list | tuple):
        return sum(weight(v) for v in value) + 2
    return 8


def _cut(text: str, keep: int) -> str:
    """The head of `text` of at most `keep` UTF-8 bytes, saying how much was cut."""
    if _utf8(text) <= keep:
        return text
    head = text[:keep] if text.isascii() else text[:keep].encode("utf-8", "surrogatepass")[:keep].decode("utf-8", "ignore")
    return f"{head}\n... [{len(text) - len(head)} characters not kept in the step history]"


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
    export for `ttl_s` after they end, within `budget_bytes` in all.

    When the budget is full, the oldest record of the owner holding the most bytes goes first (on a
    tie, the owner adding): an owner's records make room only for owners holding more. So each of N
    owners keeps at least `budget_bytes / N`, and one tenant's big episodes evict only its own."""

    def __init__(self, ttl_s: float, budget_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.budget_bytes, self.clock = ttl_s, budget_bytes, clock
        self._owners: dict[str, deque[tuple[float, int, dict[str, Any]]]] = {}  # owner -> (ended, size, record)
        self._sizes: dict[str, int] = {}
        self.size = 0

    def add(self, record: dict[str, Any]) -> None:
        if not record.get("episode_id") or self.ttl_s <= 0:
            return
        size = weight(record) + _OVERHEAD
        if size > self.budget_bytes:
            return
        owner = str(record.get("owner") or "")
        self._owners.setdefault(owner, deque()).append((self.clock(), size, record))
        self._sizes[owner] = self._sizes.get(owner, 0) + size
        self.size += size
        while self.size > self.budget_bytes:
            self._drop(max(self._sizes, key=lambda name: (self._sizes[name], name == owner)))
        self._expire()

    def find(self, key: str, owner: str | None) -> dict[str, Any] | None:
        """The latest record whose session_id or episode_id is `key`, of `owner` (None: anyone's)."""
        self._expire()
        found: list[tuple[float, int, dict[str, Any]]] = []
        for name, items in self._owners.items():
            if owner is None or name == owner:
                found.extend(item for item in items if key in (item[2].get("session_id"), item[2].get("episode_id")))
        if not found:
            return None
        latest: dict[str, Any] = max(found, key=lambda item: item[0])[2]
        return latest

    def __len__(self) -> int:
        return sum(len(items) for items in self._owners.values())

    def _drop(self, owner: str) -> None:
        """Forget `owner`'s oldest record."""
        items = self._owners[owner]
        size = items.popleft()[1]
        self._sizes[owner] -= size
        self.size -= size
        if not items:
            del self._owners[owner], self._sizes[owner]

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        for owner in list(self._owners):
            while owner in self._owners and self._owners[owner][0][0] < horizon:
                self._drop(owner)
