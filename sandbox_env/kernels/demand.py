"""How many kernels a pool keeps ready: as many as resets take while one kernel starts, between
the pool's floor and what a memory budget, shared by every pool, leaves it."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Protocol

MB = 1 << 20
# Demand older than this is forgotten, and a ready kernel beyond the target unused this long is
# closed: a burst keeps its kernels for a minute, then the pool shrinks back to its floor.
WINDOW_S = 60.0
# Acquires remembered: bounds the memory and the cost of `Demand.wanted` (a peak above it would
# be far beyond any budget anyway).
MAX_REMEMBERED = 1024
# Kernel starts take from ~50 ms (a recycled-image container) to tens of seconds (a loaded host).
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SMOOTHING = 0.3  # weight of the newest start in the moving average


class StartLatency:
    """How long kernel starts take: a histogram for `/metrics`, a moving average for the target."""

    def __init__(self) -> None:
        self.buckets = START_BUCKETS
        self.counts = [0] * (len(START_BUCKETS) + 1)  # per bucket, not cumulative; the last: +Inf
        self.sum = 0.0
        self.count = 0
        self.average: float | None = None

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1
        self.average = seconds if self.average is None else self.average + SMOOTHING * (seconds - self.average)


class Demand:
    """The acquires of the last `window_s`, as times on `clock`."""

    def __init__(self, clock: Callable[[], float], window_s: float = WINDOW_S) -> None:
        self.clock = clock
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=MAX_REMEMBERED)
        self._missed: deque[float] = deque(maxlen=MAX_REMEMBERED)

    def note(self) -> None:
        self._times.append(self.clock())

    def miss(self) -> None:
        """An acquire found nothing ready: demand the pool did not see coming."""
        self._missed.append(self.clock())

    def missed(self) -> int:
        """Acquires of the window that found nothing ready. Served acquires alone understate
        demand when the pool runs dry: back-to-back resets that each wait for a start come one
        start apart, and look like a demand of one."""
        cutoff = self.clock() - self.window_s
        while self._missed and self._missed[0] < cutoff:
            self._missed.popleft()
        return len(self._missed)

    def wanted(self, latency_s: float | None) -> int:
        """Kernels to keep ready: the most acquires of the window that came within one start
        latency of each other. A start replaces one kernel per latency, so these had to be ready
        (the reset rate times the latency, for bursts as for a steady flow)."""
        cutoff = self.clock() - self.window_s
        while self._times and self._times[0] < cutoff:
            self._times.popleft()
        if latency_s is None or not self._times:
            return 0
        times, first, peak = list(self._times), 0, 0
        for last, at in enumerate(times):
            while at - times[first] > latency_s:
                first += 1
            peak = max(peak, last - first + 1)
        return peak


class Footprint:
    """What one ready kernel of a pool holds in memory: the moving average of what kernels
    measured (`Kernel.memory_bytes`), never above their policy's limit, which stands in for
    kernels that cannot tell."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.measured: float | None = None

    def note(self, limit_bytes: int, measured: int | None) -> None:
        self.limit = limit_bytes
        if measured is not None and measured > 0:
            m = self.measured
            self.measured = measured if m is None else m + SMOOTHING * (measured - m)

    @property
    def bytes(self) -> int | None:
        if self.measured is None:
            return self.limit
        return int(self.measured) if self.limit is None else min(int(self.measured), self.limit)


class Holder(Protocol):
    @property
    def idle_bytes(self) -> int:
        """Memory its ready kernels, and those on their way back to ready, hold."""
        ...


class MemoryBudget:
    """The memory the ready kernels of every pool may hold together (`Settings.pool_memory_mb`).
    A pool grows beyond its floor only within it; floors are kept whatever they cost."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self._holders: list[Holder] = []

    def join(self, holder: Holder) -> None:
        self._holders.append(holder)

    def left_for(self, holder: Holder) -> int:
        """Bytes `holder` may hold: the budget less what the other pools hold."""
        return self.total_bytes - sum(h.idle_bytes for h in self._holders if h is not holder)
