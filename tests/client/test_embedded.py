"""`EmbeddedSandboxEnv`: the same API in-process, on a real Jupyter kernel."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sandbox_env.models import ExecStatus

pytest.importorskip("sandbox_env.kernels.jupyter.kernel", reason="the jupyter backend is not written yet")
from sandbox_env.embedded import EmbeddedSandboxEnv  # noqa: E402

pytestmark = pytest.mark.slow


async def test_state_persists_and_reset_clears_the_namespace() -> None:
    async with EmbeddedSandboxEnv(pool_size=0) as env:
        await env.reset()
        await env.step("import json\nvalue = 7")
        kept = await env.step("print(json.dumps(value))")
        state = await env.state()
        await env.reset()
        gone = await env.step("print(value)")
        gone_import = await env.step("json")
    assert kept.observation.stdout == "7\n"
    assert state.step_count == 2 and state.backend == "jupyter" and state.policy == "default"
    assert gone.observation.exception is not None and gone.observation.exception.type == "NameError"
    assert gone_import.observation.exception is not None
    assert gone_import.observation.exception.type == "NameError"


async def test_results_have_the_wire_shape_of_a_server_reply() -> None:
    async with EmbeddedSandboxEnv(pool_size=0) as env:
        await env.reset()
        result = await env.step("print('hi')")
    wire = result.observation.to_wire()
    assert set(wire["observation"]) == {"stdout", "stderr", "exit_code", "metadata"}
    assert result.observation.status is ExecStatus.OK
    assert result.metadata["execution"]["status"] == "ok"


async def test_a_step_timeout_is_reported_as_a_status() -> None:
    async with EmbeddedSandboxEnv(pool_size=0) as env:
        await env.reset()
        result = await env.step("while True: pass", timeout_s=1.0)
        after = await env.step("print('alive')")
    assert result.observation.status is ExecStatus.TIMEOUT
    assert after.observation.stdout == "alive\n"


def test_sync_wrapper_drives_the_embedded_env() -> None:
    with EmbeddedSandboxEnv(pool_size=0).sync() as env:
        env.reset()
        env.step("n = 2 ** 10")
        result = env.step("print(n)")
        state = env.state()
    assert result.observation.stdout == "1024\n"
    assert state.step_count == 2


async def test_reset_options_are_validated_and_kept_in_the_state() -> None:
    async with EmbeddedSandboxEnv(pool_size=0) as env:
        with pytest.raises(ValidationError):
            await env.reset(seed=-1)  # the server rejects it too
        await env.reset(seed=3, episode_id="ep-7", task="sum")
        state = await env.state()
    assert state.episode_id == "ep-7"
    assert state.model_extra is not None
    assert state.model_extra["seed"] == 3 and state.model_extra["task"] == "sum"


async def test_two_embedded_envs_in_one_process_are_isolated() -> None:
    # Each env owns a EpisodeManager; closing one must not disturb the other's kernel.
    first = await EmbeddedSandboxEnv(pool_size=0).connect()
    second = await EmbeddedSandboxEnv(pool_size=0).connect()
    try:
        await first.reset()
        await second.reset()
        await first.step("owner = 'first'")
        leaked = await second.step("print(owner)")
        await first.close()
        survived = await second.step("print('second alive')")
    finally:
        await first.close()
        await second.close()
    assert leaked.observation.exception is not None
    assert leaked.observation.exception.type == "NameError"
    assert survived.observation.stdout == "second alive\n"
