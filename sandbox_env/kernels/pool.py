"""A warm pool of started, never-used kernels, so a reset does not wait for a kernel to boot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sandbox_env.errors import KernelError
from sandbox_env.kernels.base import Kernel

log = logging.getLogger(__name__)
# Starting a kernel blocks the event loop for a few ms (fork/exec): wait this long after handing
# one out, so the reply that needed it is sent first.
REFILL_DELAY_S = 0.05


class KernelPool:
    """Keeps `size` started kernels ready; each kernel is handed out once and never returned.

    Refills happen one at a time in the background: kernel start is CPU-heavy and a burst of
    parallel starts would starve the kernels that are executing steps.
    """

    def __init__(self, factory: Callable[[], Kernel], size: int) -> None:
        self._factory = factory
        self.size = size
        self._ready: asyncio.Queue[Kernel] = asyncio.Queue()
        self._refill_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._closed = False
        self.cold_starts = 0

    @property
    def ready_count(self) -> int:
        return self._ready.qsize()

    async def start(self, *, wait: bool = False) -> None:
        """Begin filling the pool; with `wait`, return once it is full."""
        if self._refill_task is None and self.size > 0:
            self._refill_task = asyncio.create_task(self._refill_loop(), name="kernel-pool-refill")
            self._wakeup.set()
        while wait and self.size and self._ready.qsize() < self.size:
            if self._refill_task is not None and self._refill_task.done():
                break
            await asyncio.sleep(0.02)

    async def acquire(self) -> Kernel:
        """A started kernel that nobody has used: warm if one is ready, else started now."""
        if self._closed:
            raise KernelError("kernel pool is closed")
        while not self._ready.empty():
            kernel = self._ready.get_nowait()
            asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._wakeup.set)
            if kernel.is_alive():
                return kernel
            await kernel.close()  # died while waiting (e.g. killed from outside)
        self._wakeup.set()
        self.cold_starts += 1
        return await self._start_one()

    async def close(self) -> None:
        self._closed = True
        if self._refill_task is not None:
            self._refill_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill_task
        while not self._ready.empty():
            await self._ready.get_nowait().close()

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
            if self._ready.qsize() >= self.size:
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
            failures = 0
            if self._closed:
                await kernel.close()
                return
            self._ready.put_nowait(kernel)
