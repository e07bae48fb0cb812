"""`KernelPool` with fake kernels: warm hand-outs, refills, cold starts, dead and failing kernels."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from sandbox_env.errors import KernelError, KernelStartError
from sandbox_env.kernels.fake import FakeKernel
from sandbox_env.kernels.pool import KernelPool
from sandbox_env.testing import small_policy


class Factory:
    """Makes fake kernels; `failures` of the next starts raise KernelStartError."""

    def __init__(self, failures: int = 0) -> None:
        self.made: list[FakeKernel] = []
        self.failures = failures

    def __call__(self) -> FakeKernel:
        factory = self

        class Flaky(FakeKernel):
            async def start(self) -> None:
                if factory.failures:
                    factory.failures -= 1
                    raise KernelStartError("no kernel today")
                await super().start()

        kernel = Flaky(small_policy())
        self.made.append(kernel)
        return kernel


async def until(condition: Any, timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_warm_kernels_are_handed_out_once_and_refilled() -> None:
    factory = Factory()
    pool = KernelPool(factory, size=2)
    await pool.start(wait=True)
    assert pool.ready_count == 2
    first = await pool.acquire()
    second = await pool.acquire()
    assert first is not second and first.is_alive() and pool.cold_starts == 0
    await until(lambda: pool.ready_count == 2)  # refilled in the background, one at a time
    assert len(factory.made) == 4
    await pool.close()
    assert not any(k.is_alive() for k in factory.made[2:])  # the ready ones are closed
    assert first.is_alive()  # a handed-out kernel belongs to its episode
    with pytest.raises(KernelError):
        await pool.acquire()
    await first.close()
    await second.close()


async def test_an_empty_pool_starts_kernels_cold() -> None:
    pool = KernelPool(Factory(), size=0)
    await pool.start(wait=True)
    kernel = await pool.acquire()
    assert kernel.is_alive() and pool.cold_starts == 1 and pool.ready_count == 0
    await kernel.close()
    await pool.close()


async def test_a_kernel_that_died_while_waiting_is_skipped() -> None:
    factory = Factory()
    pool = KernelPool(factory, size=1)
    await pool.start(wait=True)
    dead = factory.made[0]
    dead.crash()
    kernel = await pool.acquire()
    assert kernel is not dead and kernel.is_alive() and pool.cold_starts == 1
    assert not dead.is_alive()
    await kernel.close()
    await pool.close()


async def test_start_failures(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    factory = Factory(failures=2)
    pool = KernelPool(factory, size=0)
    with pytest.raises(KernelStartError):  # a cold start's failure reaches the caller
        await pool.acquire()
    assert factory.made[0]._closed  # and what it started is closed
    naps: list[float] = []
    real_sleep = asyncio.sleep

    async def quick_sleep(delay: float, *args: Any) -> Any:
        naps.append(delay)
        return await real_sleep(0)

    monkeypatch.setattr("sandbox_env.kernels.pool.asyncio.sleep", quick_sleep)
    refilling = KernelPool(factory, size=1)
    with caplog.at_level(logging.ERROR, logger="sandbox_env.kernels.pool"):
        await refilling.start()
        await until(lambda: refilling.ready_count == 1)
    assert 1.0 in naps and "could not start a kernel" in caplog.text  # backed off (0.5 * 2), then retried
    await refilling.close()
    await pool.close()


class Recyclable(FakeKernel):
    """A fake kernel that recycles when `verdict` is None (else refuses with it), after `delay`."""

    verdict: str | None = None
    delay = 0.0

    async def recycle(self) -> str | None:
        await asyncio.sleep(self.delay)
        if self.verdict is None:
            self.reuses += 1
        return self.verdict


class Recycling:
    """Pools of `Recyclable` kernels; every pool and kernel is closed after the test."""

    def __init__(self) -> None:
        self.made: list[Recyclable] = []
        self.pools: list[KernelPool] = []

    async def pool(self, size: int = 1, **attributes: Any) -> KernelPool:
        def factory() -> Recyclable:
            kernel = Recyclable(small_policy())
            for name, value in attributes.items():
                setattr(kernel, name, value)
            self.made.append(kernel)
            return kernel

        self.pools.append(KernelPool(factory, size))
        await self.pools[-1].start(wait=True)
        return self.pools[-1]

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools))
        await asyncio.gather(*(kernel.close() for kernel in self.made))


@pytest_asyncio.fixture
async def recycling() -> AsyncIterator[Recycling]:
    pools = Recycling()
    yield pools
    await pools.close()


async def handed_back(pool: KernelPool, kernel: Any, owner: str = "") -> None:
    pool.release(kernel, owner)
    await until(lambda: pool.returning == 0)


async def test_a_kernel_that_cannot_recycle_is_closed_when_released() -> None:
    pool = KernelPool(Factory(), size=1)
    await pool.start(wait=True)
    kernel = await pool.acquire()
    await handed_back(pool, kernel)
    assert not kernel.is_alive() and pool.refusals == {"unsupported": 1}
    await pool.close()


async def test_a_recycled_kernel_is_handed_out_again_and_counted(recycling: Recycling) -> None:
    pool = await recycling.pool()
    kernel = await pool.acquire()
    await handed_back(pool, kernel)
    assert await pool.acquire() is kernel and kernel.reuses == 1
    assert dict(pool.handed_out) == {"fresh": 1, "recycled": 1} and not pool.refusals


async def test_a_refused_kernel_is_closed_and_its_reason_counted(recycling: Recycling) -> None:
    pool = await recycling.pool(verdict="leftovers")
    kernel = await pool.acquire()
    await handed_back(pool, kernel)
    assert not kernel.is_alive() and pool.refusals == {"leftovers": 1}
    await until(lambda: pool.ready_count == 1)  # the refill makes up for it
    assert await pool.acquire() is not kernel


async def test_acquire_waits_for_a_recycle_rather_than_starting_cold(recycling: Recycling) -> None:
    pool = await recycling.pool(delay=0.05)
    first = await pool.acquire()
    pool.release(first)  # recycling for 50 ms; nothing else is ready
    assert await pool.acquire() is first and pool.cold_starts == 0


async def test_a_pool_that_runs_short_grows_up_to_twice_its_size(recycling: Recycling) -> None:
    pool = await recycling.pool(delay=0.02)
    kernel = await pool.acquire()
    for _ in range(30):  # back-to-back episodes: each takes the next kernel, hands back the last
        following = await pool.acquire()
        pool.release(kernel)
        kernel = following
        await asyncio.sleep(0.005)
    await until(lambda: pool.ready_count + pool.returning >= 2)
    assert pool.cold_starts <= 1 and 2 <= len(recycling.made) <= 3, (pool.cold_starts, len(recycling.made))


async def test_a_recycled_kernel_goes_only_to_its_last_owner(recycling: Recycling) -> None:
    pool = await recycling.pool()
    kernel = await pool.acquire("alice")
    await handed_back(pool, kernel, "alice")
    assert await pool.acquire("bob") is not kernel and kernel.is_alive()
    assert await pool.acquire("alice") is kernel


async def test_room_for_recycled_kernels_is_twice_the_size(recycling: Recycling) -> None:
    pool = await recycling.pool()
    taken = [await pool.acquire() for _ in range(3)]  # one warm, two cold
    for kernel in taken:
        pool.release(kernel)
    await until(lambda: pool.returning == 0)
    assert pool.ready_count == 2 and pool.refusals == {"pool_full": 1}
    assert sum(k.is_alive() for k in taken) == 2
    await pool.close()
    assert not any(k.is_alive() for k in recycling.made)


async def test_close_stops_recycles_under_way_and_closes_their_kernels(recycling: Recycling) -> None:
    pool = await recycling.pool(delay=30)
    kernel = await pool.acquire()
    pool.release(kernel)
    await pool.close()
    assert pool.returning == 0 and not kernel.is_alive() and pool.refusals == {"closed": 1}
    with pytest.raises(KernelError):
        await pool.acquire()
