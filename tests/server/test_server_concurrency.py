"""The default session limit (32) holds 32 live, isolated episodes at once, and refuses the 33rd."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from sandbox_env import CapacityError, SandboxEnv
from sandbox_env.settings import Settings

pytestmark = pytest.mark.docker


async def test_default_capacity_serves_32_isolated_sessions(require_docker, live_server_factory) -> None:
    sessions = Settings.model_fields["max_sessions"].default
    assert sessions >= 32
    # Docker kernels: 32 of them fit this machine's 2 cores in seconds.
    server = live_server_factory(backend="docker", pool_size=4)
    async with contextlib.AsyncExitStack() as stack:
        envs = [await stack.enter_async_context(SandboxEnv(server.url)) for _ in range(sessions)]
        await asyncio.gather(*(env.reset() for env in envs))
        await asyncio.gather(*(env.step(f"secret = {i}") for i, env in enumerate(envs)))
        results = await asyncio.gather(*(env.step("print(secret)") for env in envs))
        assert [r.observation.stdout for r in results] == [f"{i}\n" for i in range(sessions)]

        with pytest.raises(CapacityError):
            async with SandboxEnv(server.url, connect_retries=0) as extra:
                await extra.reset()
    # The server frees a slot when it reads `close`, which under 32 container kills can lag the
    # client's own close handshake; every slot must still come back.
    deadline = time.monotonic() + 60
    while server.manager.active and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert server.manager.active == 0
