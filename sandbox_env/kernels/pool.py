"""A warm pool of started kernels, so a reset does not wait for a kernel to boot: never-used ones,
and ones whose episode is over that proved clean (`Kernel.recycle`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable

from sandbox_env.errors import KernelError
from sandbox_env.kernels.base import Kernel

log = logging.getLogger(__name__)
# Starting a kernel blocks the event loop for a few ms (fork/exec): wait this long after handing
# one out, so the reply that needed it is sent first.
REFILL_DELAY_S = 0.05


class KernelPool:
    """Keeps `size` started kernels ready. A kernel handed out serves one episode; then `release`
    recycles it in the background and keeps it if it proved clean and there is room (up to twice
    `size` ready), else closes it (kernels that cannot recycle are simply closed). A recycled kernel goes only to the owner
    (tenant) whose episode it served: what a clean-slate check cannot see never crosses tenants.

    Refills happen one at a time in the background: kernel start is CPU-heavy and a burst of
    parallel starts would starve the kernels that are executing steps. A kernel being recycled
    counts as one coming: it takes milliseconds, a start hundreds of them, so the refill waits
    for it, and so does `acquire` when nothing is ready for its owner but a recycle is under way.
    Each `acquire` that had to wait or start cold lets the refill aim one kernel higher (at most
    `size` higher): back-to-back episodes get enough kernels in circulation that one is ready
    while the last ones recycle.
    """

    def __init__(self, factory: Callable[[], Kernel], size: int) -> None:
        self._factory = factory
        self.size = size
        # (kernel, the owner it served last; None: never used)
        self._ready: deque[tuple[Kernel, str | None]] = deque()
        self._refill_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._closed = False
        self.cold_starts = 0
        self._returning: set[asyncio.Task[None]] = set()  # kernels taken back: recycled, then kept or closed
        self._recycling: dict[asyncio.Task[None], str] = {}  # those not yet recycled, and their owners
        self._returned = asyncio.Event()  # set whenever a recycle is done, kept or not
        self._short = 0  # kernels the refill adds to `size`: acquires found none ready
        self.handed_out: Counter[str] = Counter()  # "fresh" (never used) or "recycled"
        self.refusals: Counter[str] = Counter()  # why kernels were closed instead of recycled

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def returning(self) -> int:
        """Kernels taken back and not yet kept or closed."""
        return len(self._returning)

    async def start(self, *, wait: bool = False) -> None:
        """Begin filling the pool; with `wait`, return once it is full."""
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
                return kernel
            await kernel.close()  # died while waiting (e.g. killed from outside)
        self._wakeup.set()
        self.cold_starts += 1
        self.handed_out["fresh"] += 1
        return await self._start_one()

    def _take(self, owner: str) -> Kernel | None:
        """`owner`'s newest recycled kernel, else the oldest never used: those can serve anyone."""
        mine = [entry for entry in self._ready if entry[1] == owner]
        fresh = [entry for entry in self._ready if entry[1] is None]
        entry = mine[-1] if mine else fresh[0] if fresh else None
        if entry is None:
            return None
        self._ready.remove(entry)
        return entry[0]

    def release(self, kernel: Kernel, owner: str = "") -> None:
        """Take back a kernel whose episode (of `owner`) is over; never waits: it is recycled in
        the background."""
        task = asyncio.get_running_loop().create_task(self._take_back(kernel, owner), name="kernel-pool-recycle")
        self._returning.add(task)
        self._recycling[task] = owner
        task.add_done_callback(self._returning.discard)

    async def _take_back(self, kernel: Kernel, owner: str) -> None:
        why: str | None = "failed"  # unless recycle() answers (it may raise, or be cancelled)
        try:
            why = self._no_room() or await kernel.recycle()
            why = why or self._no_room()
        except Exception:
            log.exception("recycling a kernel failed")
        finally:
            self._recycling.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            why = "closed" if self._closed else why
            if why is None:
                self._ready.append((kernel, owner))
            else:
                self.refusals[why] += 1
                self._wakeup.set()  # the refill may be short of one now
            self._returned.set()
            if why is not None:
                await kernel.close()

    def _no_room(self) -> str | None:
        """Room for a recycled kernel: up to twice the pool's size, since the refill aims at the
        size counting kernels in use as gone (with one client, one in use comes back to `size`
        ready ones: closing it would make the refill start a container per episode)."""
        return "closed" if self._closed else "pool_full" if len(self._ready) >= 2 * self.size else None

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
            await self._ready.popleft()[0].close()

    async def _start_one(self) -> Kernel:
        kernel = self._factory()
        try:
            await kernel.start()
        except BaseException:
            await kernel.close()
            raise
        return kernel

    async def _refill_loop(self) -> None:
        failures = 0
        while not self._closed:
            if len(self._ready) + len(self._recycling) >= self.size + self._short:
                self._wakeup.clear()
                await self._wakeup.wait()
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
            self._ready.append((kernel, None))
