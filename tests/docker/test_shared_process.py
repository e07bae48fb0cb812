"""Several managers in one process (an evaluation beside an embedded env): closing one must not
remove the other's sandboxes."""

from __future__ import annotations

import pytest

from sandbox_env import EmbeddedSandboxEnv

pytestmark = pytest.mark.docker


async def test_closing_one_embedded_env_leaves_the_others_sandbox_running(docker_client) -> None:
    first = EmbeddedSandboxEnv(backend="docker", pool_size=0)
    second = EmbeddedSandboxEnv(backend="docker", pool_size=0)
    try:
        await first.reset()
        await second.reset()
        await second.step("kept = 'still here'")
        await first.close()  # runs the backend's teardown only if it was the last manager
        result = await second.step("print(kept)")
        assert result.observation.stdout == "still here\n"
    finally:
        await first.close()
        await second.close()
