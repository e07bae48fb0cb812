"""`KernelPool` following demand, with fake kernels and a clock the test moves: the target grows
with a burst of acquires, within the memory budget all pools share, and falls back to the floor
once demand stops; starts are timed, ready kernels weighed, kernels in use counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from sandbox_env.kernels.demand import MB, WINDOW_S, Demand, MemoryBudget
from sandbox_env.kernels.fake import FakeKernel
from sandbox_env.kernels.pool import KernelPool
from sandbox_env.testing import small_policy

POLICY_MB = 256  # small_policy's memory_mb: what a kernel that cannot weigh itself is taken to hold


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


class Clock:
    """The pools' clock: only the test (and the kernels' starts) move it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.start_s = 2.0  # what each kernel start costs on this clock

    def __call__(self) -> float:
        return self.now


class Pools:
    """Pools of fake kernels whose start takes `clock.start_s` and that weigh `weight_mb`
    (None: they cannot tell); every pool and kernel is closed after the test."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.made: list[FakeKernel] = []
        self.pools: list[KernelPool] = []

    async def pool(self, size: int, budget: MemoryBudget | None, weight_mb: int | None = None) -> KernelPool:
        clock, made = self.clock, self.made

        class Timed(FakeKernel):
            async def start(self) -> None:
                clock.now += clock.start_s
                await super().start()

            async def memory_bytes(self) -> int | None:
                return None if weight_mb is None else weight_mb * MB

        def factory() -> FakeKernel:
            made.append(Timed(small_policy()))
            return made[-1]

        self.pools.append(KernelPool(factory, size, budget=budget, clock=clock))
        await self.pools[-1].start(wait=True)
        return self.pools[-1]

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools))
        await asyncio.gather(*(kernel.close() for kernel in self.made))


@pytest_asyncio.fixture
async def pools() -> AsyncIterator[Pools]:
    made = Pools()
    yield made
    await made.close()


async def burst(pool: KernelPool, clock: Clock, count: int) -> list[Any]:
    """`count` acquires at one instant (their cold starts cost nothing on the clock)."""
    cost, clock.start_s = clock.start_s, 0.0
    taken = [await pool.acquire() for _ in range(count)]
    clock.start_s = cost
    return taken


def test_demand_is_the_most_acquires_within_one_start_latency() -> None:
    now = [0.0]
    demand = Demand(lambda: now[0])
    assert demand.wanted(2.0) == 0  # no acquires, no demand
    for _ in range(9):  # a steady 2 a second
        demand.note()
        now[0] += 0.5
    demand.note()
    assert demand.wanted(None) == 0  # no start timed yet: nothing to cover
    assert demand.wanted(2.0) == 5  # rate x latency (+ the one that just came)
    assert demand.wanted(0.1) == 1
    now[0] += WINDOW_S + 5  # all older than the window: forgotten
    assert demand.wanted(2.0) == 0


async def test_a_burst_grows_the_target_up_to_the_budget(pools: Pools) -> None:
    budget = MemoryBudget(5 * POLICY_MB * MB)  # room for 5 kernels the size of the policy's limit
    pool = await pools.pool(size=1, budget=budget)
    assert (pool.target, pool.ready_count, pool.latency.average) == (1, 1, 2.0)
    assert pool.footprint.bytes == POLICY_MB * MB  # fake kernels cannot weigh themselves
    taken = await burst(pool, pools.clock, 8)
    assert pool.demand.wanted(pool.latency.average) == 8 and pool.ceiling == 5
    assert pool.target == 5 and pool.in_use == 8
    await until(lambda: pool.ready_count == 5)  # refilled in the background, one at a time
    await asyncio.sleep(0.05)
    assert pool.ready_count == 5, "the refill went beyond the budget"
    for kernel in taken:
        await kernel.close()
    assert pool.in_use == 0


async def test_pools_share_the_budget(pools: Pools) -> None:
    budget = MemoryBudget(5 * POLICY_MB * MB)
    first = await pools.pool(size=3, budget=budget)
    second = await pools.pool(size=1, budget=budget)
    assert (first.ceiling, second.ceiling) == (4, 2)  # each: the budget less what the other holds
    await burst(second, pools.clock, 6)
    await until(lambda: second.ready_count == 2)
    assert second.target == 2 and first.ceiling == 3  # the floor stays whatever the budget
    floor_only = await pools.pool(size=2, budget=MemoryBudget(0))
    await burst(floor_only, pools.clock, 6)
    await until(lambda: floor_only.ready_count == 2)
    assert floor_only.demand.wanted(floor_only.latency.average) == 6
    assert floor_only.target == 2 and floor_only.ceiling == 2  # a budget of 0: the floor only


async def test_kernels_that_weigh_themselves_set_the_footprint(pools: Pools) -> None:
    pool = await pools.pool(size=1, budget=MemoryBudget(640 * MB), weight_mb=64)
    assert pool.footprint.bytes == 64 * MB and pool.ceiling == 10
    await burst(pool, pools.clock, 12)
    assert pool.target == 10
    heavy = await pools.pool(size=1, budget=MemoryBudget(8 * POLICY_MB * MB), weight_mb=10 * POLICY_MB)
    assert heavy.footprint.bytes == POLICY_MB * MB  # never above the policy's limit


async def test_the_target_falls_back_to_the_floor_when_demand_stops(pools: Pools) -> None:
    pool = await pools.pool(size=1, budget=MemoryBudget(5 * POLICY_MB * MB))
    for kernel in await burst(pool, pools.clock, 8):
        pool.release(kernel)  # fake kernels do not recycle: closed
    await until(lambda: pool.ready_count == 5 and pool.returning == 0)
    pools.clock.now += WINDOW_S / 2
    await pool.shrink()
    assert (pool.target, pool.ready_count) == (5, 5)  # the burst is still recent
    pools.clock.now += WINDOW_S
    await pool.shrink()
    assert (pool.target, pool.ready_count, pool.idle_closed) == (1, 1, 4)
    assert sum(kernel.is_alive() for kernel in pools.made) == 1


async def test_a_pool_of_size_zero_stays_empty_under_demand(pools: Pools) -> None:
    pool = await pools.pool(size=0, budget=MemoryBudget(10 * POLICY_MB * MB))
    taken = await burst(pool, pools.clock, 4)
    assert pool.target == 0 and pool.cold_starts == 4 and pool.in_use == 4
    await asyncio.sleep(0.05)
    assert pool.ready_count == 0 and len(pools.made) == 4
    pool.release(taken[0])
    await until(lambda: pool.returning == 0)
    assert pool.in_use == 3


async def test_starts_are_timed_for_the_histogram(pools: Pools) -> None:
    pool = await pools.pool(size=2, budget=None)
    latency = pool.latency
    assert latency.count == 2 and latency.sum == 4.0
    assert latency.counts[latency.buckets.index(2.5)] == 2  # 2 s: in the bucket le=2.5
    await burst(pool, pools.clock, 3)  # two warm, one cold start of 0 s
    await until(lambda: pool.ready_count == 2)  # then two refills of 2 s
    assert latency.count == 5 and latency.counts[0] == 1 and latency.counts[latency.buckets.index(2.5)] == 4
    assert latency.sum == 8.0


async def test_acquires_that_start_cold_raise_the_target_for_the_window(pools: Pools) -> None:
    """Back-to-back resets that each wait for a start come one start apart: served acquires alone
    would look like a demand of one. Each that found nothing ready counts, within the ceiling."""
    pool = await pools.pool(size=1, budget=MemoryBudget(6 * POLICY_MB * MB))
    taken = []
    for _ in range(8):  # one at a time, each a start after the last: never two within one start
        taken.append(await pool.acquire())
        await until(lambda: pool.returning == 0)
    assert pool.demand.wanted(pool.latency.average) <= 3  # far below what the misses ask for
    assert pool.demand.missed() >= 6 and pool.target == pool.ceiling == 6
    await until(lambda: pool.ready_count == 6)  # ready for the next such run
    pools.clock.now += WINDOW_S + 1
    assert pool.demand.missed() == 0 and pool.target == 1
