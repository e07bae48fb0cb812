"""A warm pool of started kernels, so a reset does not wait for a kernel to boot: never-used ones,
and ones whose episode is over that proved clean (`Kernel.recycle`). How many it keeps ready
follows demand (`kernels/demand.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from sandbox_env.errors import KernelError
from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.demand import MB, Demand, Footprint, MemoryBudget, StartLatency

log = logging.getLogger(__name__)
# Starting a kernel blocks the event loop for a few ms (fork/exec): wait this long after handing
# one out, so the reply that needed it is sent first.
REFILL_DELAY_S = 0.05
HOUSEKEEPING_S = 5.0  # how often an idle refill looks for kernels demand no longer needs


@dataclass(eq=False)
class Ready:
    kernel: Kernel
    owner: str | None  # the owner it served last; None: never used
    since: float  # on the pool's clock


class KernelPool:
    """Keeps started kernels ready: at least `size` (the floor), more while resets come faster
    than kernels start, as far as `budget` allows (`target`). A kernel handed out serves one
    episode; then `release` recycles it in the background and keeps it if it proved clean and
    there is room (twice the target, at least twice `size`), else closes it (kernels that cannot
    recycle are simply closed). A recycled kernel goes only to the owner (tenant) whose episode it
    served: what a clean-slate check cannot see never crosses tenants.

    Refills happen one at a time in the background: kernel start is CPU-heavy and a burst of
    parallel starts would starve the kernels that are executing steps. A kernel being recycled
    counts as one coming: it takes milliseconds, a start hundreds of them, so the refill waits
    for it, and so does `acquire` when nothing is ready for its owner but a recycle is under way.
    Each `acquire` that had to wait or start cold lets the refill aim one kernel higher (at most
    `size` higher): back-to-back episodes get enough kernels in circulation that one is ready
    while the last ones recycle. Ready kernels beyond the target that nobody took for a whole
    demand window are closed (`shrink`): the pool falls back to its floor when demand stops.
    `size` 0 is no pool: every acquire starts a kernel.
    """

    def __init__(self, factory: Callable[[], Kernel], size: int, *, budget: MemoryBudget | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._factory = factory
        self.size = size
        self._clock = clock
        self._ready: deque[Ready] = deque()
        self._refill_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._closed = False
        self.cold_starts = 0
        self._returning: set[asyncio.Task[None]] = set()  # kernels taken back: recycled, then kept or closed
        self._recycling: dict[asyncio.Task[None], str] = {}  # those not yet recycled, and their owners
        self._returned = asyncio.Event()  # set whenever a recycle is done, kept or not
        self._short = 0  # kernels the refill adds to `size`: acquires found none ready
        self._in_use: weakref.WeakSet[Kernel] = weakref.WeakSet()  # handed out, not released
        self.demand = Demand(clock)
        self.latency = StartLatency()
        self.footprint = Footprint()
        self.budget = budget
        if budget is not None:
            budget.join(self)
        self.handed_out: Counter[str] = Counter()  # "fresh" (never used) or "recycled"
        self.refusals: Counter[str] = Counter()  # why kernels were closed instead of recycled
        self.idle_closed = 0  # ready kernels closed because demand no longer needed them

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def returning(self) -> int:
        """Kernels taken back and not yet kept or closed."""
        return len(self._returning)

    @property
    def in_use(self) -> int:
        """Kernels handed out and not released (episodes', gradings' and their stashes'), alive;
        kernels that cannot recycle are closed by their episode, never released."""
        return sum(1 for kernel in self._in_use if kernel.is_alive())

    @property
    def idle_bytes(self) -> int:
        """Memory this pool's ready kernels, and those recycling towards ready, hold (its part of
        the budget)."""
        return (len(self._ready) + len(self._recycling)) * (self.footprint.bytes or 0)

    @property
    def ceiling(self) -> int:
        """Most kernels demand may keep ready: what the budget leaves this pool, at least `size`."""
        each = self.footprint.bytes
        if self.budget is None or not each or not self.size:
            return self.size
        return max(self.size, self.budget.left_for(self) // each)

    @property
    def target(self) -> int:
        """Kernels the refill keeps ready (or recycling): the floor, plus kernels acquires found
        missing, or the demand within the ceiling when that is more: the peak of acquires within
        one start (`Demand.wanted`), or the floor plus every acquire of the window that found
        nothing ready (`Demand.missed`)."""
        if not self.size:
            return 0
        demand = max(self.demand.wanted(self.latency.average), self.size + self.demand.missed())
        return max(self.size + self._short, min(demand, self.ceiling))

    async def start(self, *, wait: bool = False) -> None:
        """Begin filling the pool; with `wait`, return once it holds its floor."""
        if self._refill_task is None and self.size > 0:
            self._refill_task = asyncio.create_task(self._refill_loop(), name="kernel-pool-refill")
            self._wakeup.set()
        while wait and self.size and len(self._ready) < self.size:
            if self._refill_task is not None and self._refill_task.done():
                break
            await asyncio.sleep(0.02)

    async def acquire(self, owner: str = "") -> Kernel:
        """A started kernel for `owner`, never used or recycled after one of `owner`'s episodes: a
        ready one, else the next to come back from such a recycle, else one started now."""
        self.demand.note()
        while True:
            if self._closed:
                raise KernelError("kernel pool is closed")
            kernel = self._take(owner)
            if kernel is None:
                self._short = min(self._short + 1, self.size)
                if owner not in self._recycling.values():
                    break
                self._returned.clear()
                await self._returned.wait()
                continue
            asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._wakeup.set)
            if kernel.is_alive():
                self.handed_out["recycled" if kernel.reuses else "fresh"] += 1
                self._in_use.add(kernel)
                return kernel
            await kernel.close()  # died while waiting (e.g. killed from outside)
        self._wakeup.set()
        self.demand.miss()  # a cold start: no recycle of the owner's was coming either
        self.cold_starts += 1
        self.handed_out["fresh"] += 1
        kernel = await self._start_one()
        self._in_use.add(kernel)
        return kernel

    def _take(self, owner: str) -> Kernel | None:
        """`owner`'s newest recycled kernel, else the oldest never used: those can serve anyone."""
        mine = [entry for entry in self._ready if entry.owner == owner]
        fresh = [entry for entry in self._ready if entry.owner is None]
        entry = mine[-1] if mine else fresh[0] if fresh else None
        if entry is None:
            return None
        self._ready.remove(entry)
        return entry.kernel

    def release(self, kernel: Kernel, owner: str = "") -> None:
        """Take back a kernel whose episode (of `owner`) is over; never waits: it is recycled in
        the background."""
        self._in_use.discard(kernel)
        task = asyncio.get_running_loop().create_task(self._take_back(kernel, owner), name="kernel-pool-recycle")
        self._returning.add(task)
        self._recycling[task] = owner
        task.add_done_callback(self._returning.discard)

    async def _take_back(self, kernel: Kernel, owner: str) -> None:
        why: str | None = "failed"  # unless recycle() answers (it may raise, or be cancelled)
        try:
            why = self._no_room() or await kernel.recycle()
            why = why or self._no_room()
            if why is None:
                await self._measure(kernel)
        except Exception:
            log.exception("recycling a kernel failed")
        finally:
            self._recycling.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            why = "closed" if self._closed else why
            if why is None:
                self._ready.append(Ready(kernel, owner, self._clock()))
            else:
                self.refusals[why] += 1
                self._wakeup.set()  # the refill may be short of one now
            self._returned.set()
            if why is not None:
                await kernel.close()

    def _no_room(self) -> str | None:
        """Room for a recycled kernel: twice the target, within the ceiling, and at least twice
        the floor, since the refill aims at the target counting kernels in use as gone (with one
        client, one in use comes back to `size` ready ones: closing it would make the refill start
        a container per episode)."""
        if self._closed:
            return "closed"
        room = max(2 * self.size, min(2 * self.target, self.ceiling))
        return "pool_full" if len(self._ready) >= room else None

    async def shrink(self) -> int:
        """Close the ready kernels beyond the target that nobody took for a whole demand window,
        those ready longest first; the refill calls it now and then. Returns how many it closed."""
        excess = len(self._ready) - self.target
        if excess <= 0:
            return 0
        cutoff = self._clock() - self.demand.window_s
        stale = sorted((entry for entry in self._ready if entry.since <= cutoff), key=lambda e: e.since)[:excess]
        for entry in stale:
            self._ready.remove(entry)
        self.idle_closed += len(stale)
        await asyncio.gather(*(entry.kernel.close() for entry in stale), return_exceptions=True)
        return len(stale)

    async def close(self) -> None:
        self._closed = True
        if self._refill_task is not None:
            self._refill_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill_task
        for task in list(self._recycling):  # each closes its kernel as it ends
            task.cancel()
        await asyncio.gather(*self._returning, return_exceptions=True)
        while self._ready:
            await self._ready.popleft().kernel.close()

    async def _start_one(self) -> Kernel:
        kernel = self._factory()
        began = self._clock()
        try:
            await kernel.start()
        except BaseException:
            await kernel.close()
            raise
        self.latency.observe(self._clock() - began)
        await self._measure(kernel)
        return kernel

    async def _measure(self, kernel: Kernel) -> None:
        """What a ready kernel holds, for the budget (never fails the kernel)."""
        try:
            measured = await kernel.memory_bytes()
        except Exception:
            log.debug("measuring a kernel's memory failed", exc_info=True)
            measured = None
        self.footprint.note(kernel.policy.memory_mb * MB, measured)

    async def _refill_loop(self) -> None:
        failures = 0
        while not self._closed:
            await self.shrink()
            if len(self._ready) + len(self._recycling) >= self.target:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), HOUSEKEEPING_S)
                continue
            try:
                kernel = await self._start_one()
            except Exception:
                failures += 1
                log.exception("warm pool could not start a kernel (attempt %d)", failures)
                await asyncio.sleep(min(30.0, 0.5 * 2**failures))
                continue
            failures, self._short = 0, max(0, self._short - 1)
            if self._closed:
                await kernel.close()
                return
            self._ready.append(Ready(kernel, None, self._clock()))
