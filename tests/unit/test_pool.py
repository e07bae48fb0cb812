"""`KernelPool` with fake kernels: warm hand-outs, refills, cold starts, dead and failing kernels."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

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
