"""`SandboxEnv` against a real uvicorn server on loopback, with real kernels."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pydantic import ValidationError

from sandbox_env import CapacityError, ClientError, CodeAction, SandboxEnv, SandboxEnvError
from sandbox_env.models import ExecStatus


async def test_state_persists_across_steps(live_server) -> None:
    async with SandboxEnv(live_server.url) as env:
        reset = await env.reset()
        assert reset.done is False
        await env.step("x = 41")
        result = await env.step("print(x + 1)")
        state = await env.state()
    assert result.observation.stdout == "42\n"
    assert result.observation.exit_code == 0
    assert result.observation.status is ExecStatus.OK
    assert state.step_count == 2 and state.last_exit_code == 0
    assert state.episode_id and state.backend == live_server.settings.backend


async def test_step_accepts_str_dict_and_code_action(live_server) -> None:
    async with SandboxEnv(live_server.url) as env:
        await env.reset()
        outputs = [(await env.step(action)).observation.stdout
                   for action in ("print('a')", {"code": "print('b')"}, CodeAction(code="print('c')"))]
    assert outputs == ["a\n", "b\n", "c\n"]


async def test_an_exception_in_the_code_is_an_observation_not_an_error(live_server) -> None:
    async with SandboxEnv(live_server.url) as env:
        await env.reset()
        result = await env.step("1 / 0")
        after = await env.step("print('still here')")
    assert result.observation.exit_code != 0
    assert result.observation.status is ExecStatus.ERROR
    assert result.observation.exception is not None
    assert result.observation.exception.type == "ZeroDivisionError"
    assert "\x1b[" not in result.observation.exception.traceback
    assert after.observation.stdout == "still here\n"


async def test_reset_gives_a_clean_namespace_and_a_new_episode(live_server) -> None:
    async with SandboxEnv(live_server.url) as env:
        await env.reset()
        await env.step("secret = 1")
        first = (await env.state()).episode_id
        await env.reset()
        result = await env.step("print(secret)")
        second = await env.state()
    assert result.observation.exception is not None
    assert result.observation.exception.type == "NameError"
    assert second.episode_id != first and second.step_count == 1


async def test_reset_options_reach_the_state_and_bad_ones_fail_before_sending(live_server) -> None:
    async with SandboxEnv(live_server.url) as env:
        with pytest.raises(ValidationError):
            await env.reset(seed=-1)
        await env.reset(seed=3, episode_id="ep-7", task="sum")
        state = await env.state()
    assert state.episode_id == "ep-7"
    assert state.model_extra is not None and state.model_extra["task"] == "sum"


async def test_concurrent_calls_on_one_client_get_their_own_replies(live_server) -> None:
    # The lock keeps one request in flight, so no reply is handed to the wrong caller.
    async with SandboxEnv(live_server.url) as env:
        await env.reset()
        results = await asyncio.gather(*(env.step(f"print({i})") for i in range(6)))
    assert [r.observation.stdout for r in results] == [f"{i}\n" for i in range(6)]


async def test_a_rejected_message_leaves_the_session_usable(live_server) -> None:
    async with SandboxEnv(live_server.url) as env:
        await env.reset()
        await env.step("kept = 'yes'")
        with pytest.raises(SandboxEnvError) as info:
            await env._request({"type": "bogus"}, "observation")  # what a buggy client could send
        result = await env.step("print(kept)")
    assert info.value.details.get("wire_code") == "UNKNOWN_TYPE"
    assert result.observation.stdout == "yes\n"


async def test_a_reply_timeout_drops_the_socket_and_never_yields_a_stale_reply(live_server) -> None:
    # OpenEnv issue #1143: a late reply must not be read as the answer to the next request.
    async with SandboxEnv(live_server.url) as env:
        await env.reset()
        env.message_timeout_s = 0.5
        with pytest.raises(ClientError, match="no reply"):
            await env.step("import time; time.sleep(3); print('stale')")
        with pytest.raises(ClientError, match="reset"):
            await env.step("print('lost episode')")
        env.message_timeout_s = 60.0
        await env.reset()
        result = await env.step("print('fresh')")
    assert result.observation.stdout == "fresh\n"


async def test_a_cancelled_request_also_gives_up_its_socket(live_server) -> None:
    async with SandboxEnv(live_server.url) as env:
        await env.reset()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(env.step("import time; time.sleep(3); print('stale')"), 0.5)
        with pytest.raises(ClientError, match="reset"):
            await env.state()
        await env.reset()
        result = await env.step("print('fresh')")
    assert result.observation.stdout == "fresh\n"


async def test_step_timeout_is_sent_and_extends_the_reply_wait(live_server) -> None:
    async with SandboxEnv(live_server.url) as env:
        await env.reset()
        env.message_timeout_s = 0.5  # shorter than the step below: timeout_s must win
        slow = await env.step("import time; time.sleep(1); print('done')", timeout_s=30)
        looping = await env.step("while True: pass", timeout_s=1)
        env.message_timeout_s = 60.0
        after = await env.step("print('alive')")
    assert slow.observation.stdout == "done\n"
    assert looping.observation.status is ExecStatus.TIMEOUT
    assert after.observation.stdout == "alive\n"


async def test_capacity_error_when_the_server_is_full(live_server_factory) -> None:
    server = live_server_factory(max_sessions=1, pool_size=0)
    first = SandboxEnv(server.url)
    await first.reset()
    second = SandboxEnv(server.url)
    with pytest.raises(CapacityError):
        await second.reset()
    await first.close()
    # The slot is freed when the server notices the close; retry until it does.
    deadline = time.monotonic() + 60
    while True:
        try:
            result = await second.reset()
            break
        except CapacityError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    assert result.done is False
    assert (await second.step("print('in')")).observation.stdout == "in\n"
    await second.close()


async def test_connecting_to_a_closed_port_raises_client_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        env = SandboxEnv(url, connect_retries=1, connect_timeout_s=5)
        with pytest.raises(ClientError, match="cannot connect"):
            await env.reset()
        with pytest.raises(ClientError):
            await env.health()


async def test_health_and_close_is_idempotent(live_server) -> None:
    env = SandboxEnv(live_server.url)
    assert (await env.health())["status"] == "healthy"
    await env.reset()
    await env.close()
    await env.close()
    # A closed client opens a new connection (and episode) on its next reset.
    assert (await env.reset()).done is False
    await env.close()


def test_constructor_takes_openenv_arguments_and_rejects_unknown_ones() -> None:
    env = SandboxEnv(base_url="http://127.0.0.1:9", provider=None, websocket_ping_interval_s=None)
    assert env.ws_url == "ws://127.0.0.1:9/ws"
    with pytest.raises(TypeError, match="bogus"):
        SandboxEnv("http://127.0.0.1:9", bogus=1)


async def test_plain_with_inside_an_event_loop_points_to_async_with() -> None:
    with pytest.raises(TypeError, match=r"async with"), SandboxEnv("http://127.0.0.1:9"):
        pass


def test_calls_without_await_block_outside_an_event_loop(live_server) -> None:
    # OpenEnv >= 0.4 habit (and TRL examples): no await, no .sync()
    with SandboxEnv(live_server.url) as env:
        env.reset()
        env.step("x = 20")
        result = env.step("print(x * 2 + 2)")
        assert result.observation.stdout == "42\n"
        assert env.state().step_count == 2
    assert env._blocking_loop is None  # close() stopped the private loop thread


async def test_a_blocking_client_refuses_to_be_awaited_later(live_server) -> None:
    import asyncio

    env = SandboxEnv(live_server.url)
    await asyncio.to_thread(env.reset)  # blocking use, from a thread without a loop
    with pytest.raises(RuntimeError, match="blocking calls"):
        await env.step("1")
    await asyncio.to_thread(env.close)
