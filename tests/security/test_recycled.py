"""The next-episode probes of a fresh sandbox, run on a recycled one (issue #13): with the shipped
`default` policy (which recycles), an episode infects what it can, is handed back to the pool as
the server does, and the next episode (the same owner's) runs `infected` and friends.

An infection of the namespace only (builtins, variables, patched modules, hooks) leaves a sandbox
that recycles: the next episode must then be in the same container (else the probes prove
nothing about recycling) and see none of it. An infection with any trace outside the namespace
(a daemon, files in every shared directory, the environment) must make the pool remove the
container: the next episode is in another one, and sees nothing either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from security_helpers import INFECTION, kill_own_leftovers, new_kernel, processes_with, remove_markers, run_probe, token

from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.pool import KernelPool
from sandbox_env.models import ExecStatus

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Everything of the worker's interpreter an episode can patch, for the next episode to inherit.
NAMESPACE_INFECTION = ("import builtins, string, sys, unittest\nbuiltins.sbx_infected = {token!r}\nsbx_infected = {token!r}\n"
                       "sys.exit = lambda *a: None\nstring.capwords = lambda *a, **k: 'patched'\nsys.excepthook = lambda *a: None\n"
                       "unittest.TestCase.assertEqual = lambda *a, **k: None\nsys.modules['os'].sbx_infected = {token!r}\n")
# What a fresh interpreter shows: each must hold in the next episode.
PRISTINE = ("import builtins, os, string, sys, unittest\n"
            "print(getattr(sys.exit, '__module__', None) in (None, 'sys'),"
            " string.capwords('a b'), unittest.TestCase.assertEqual.__module__, hasattr(os, 'sbx_infected'),"
            " sys.excepthook is sys.__excepthook__, __debug__, 6 * 7)\n")
CLEAN = "True A B unittest.case False True True 42\n"
DAEMON = ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', {token!r}], start_new_session=True, "
          "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n")


@pytest_asyncio.fixture
async def pool(require_docker: None) -> AsyncIterator[KernelPool]:
    """A pool of one, of Docker kernels under the shipped default policy (room for the probes)."""
    made: list[Kernel] = []

    def kernel() -> Kernel:
        made.append(new_kernel("docker"))
        return made[-1]

    pool = KernelPool(kernel, 1)
    await pool.start(wait=True)
    yield pool
    await pool.close()
    for each in made:
        await each.close()


async def next_episode(pool: KernelPool, kernel: Kernel) -> tuple[Kernel, bool]:
    """Hand `kernel` back as a closed episode's, then take the next one: (it, whether it is the
    same container)."""
    container = getattr(kernel, "container_id", None)
    pool.release(kernel)
    deadline = time.monotonic() + 60
    while pool.returning:
        assert time.monotonic() < deadline, "the recycle never ended"
        await asyncio.sleep(0.01)
    following = await pool.acquire()
    return following, getattr(following, "container_id", None) == container


async def test_the_default_policy_recycles(pool: KernelPool) -> None:
    kernel = await pool.acquire()
    assert kernel.policy.reuses > 0  # else the tests below would prove nothing about recycling


async def test_a_namespace_infection_does_not_reach_the_recycled_sandbox(pool: KernelPool) -> None:
    infection, marker = token("infect"), token("marker")
    kernel = await pool.acquire()
    assert (await kernel.execute(PRISTINE.format())).stdout == CLEAN  # a control: the probe, on a fresh one
    infected = await kernel.execute(NAMESPACE_INFECTION.format(token=infection) + PRISTINE.format())
    assert infected.status is ExecStatus.OK and infected.stdout != CLEAN, infected  # the infection took
    following, same = await next_episode(pool, kernel)
    assert same, pool.refusals  # recycled: the probes below run in the infected episode's container
    seen = await run_probe(following, "infected", {"name": marker})
    assert not {k: v for k, v in seen.items() if v}, seen
    assert (await following.execute(PRISTINE.format())).stdout == CLEAN


@pytest.mark.parametrize("trace", ["daemon", "files", "environment"])
async def test_an_infection_with_traces_costs_the_sandbox(pool: KernelPool, trace: str) -> None:
    infection, marker = token("infect"), token("marker")
    kernel = await pool.acquire()
    planted: list[str] = []
    try:
        if trace == "daemon":
            assert (await kernel.execute(DAEMON.format(token=infection))).status is ExecStatus.OK
            assert processes_with(infection), "harness: the daemon did not start"
        elif trace == "files":
            planted = (await run_probe(kernel, "plant", {"name": marker, "token": infection}))["planted"]
            assert planted, "harness: nothing was planted"
        else:
            assert (await kernel.execute(INFECTION.format(token=infection))).status is ExecStatus.OK
        following, same = await next_episode(pool, kernel)
        assert not same and pool.refusals == {"leftovers": 1}, pool.refusals
        seen = await run_probe(following, "infected", {"name": marker})
        assert not {k: v for k, v in seen.items() if v}, seen
        assert processes_with(infection) == [], "the daemon outlived its sandbox"
    finally:
        remove_markers(planted, marker)
        kill_own_leftovers(infection)
