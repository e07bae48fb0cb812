"""The `/ws` session protocol against a real server: frames, state, isolation, bad input."""

from __future__ import annotations

import json

import pytest
from websockets.exceptions import ConnectionClosed

OBS_KEYS = {"stdout", "stderr", "exit_code", "metadata"}


async def test_reset_step_state_frames(live_server, ws_session) -> None:
    async with ws_session(live_server) as s:
        reply = await s.request({"type": "reset", "data": {"seed": 1, "episode_id": "ep-1"}})
        assert reply["type"] == "observation" and set(reply) == {"type", "data"}
        data = reply["data"]
        assert set(data) == {"observation", "reward", "done", "metadata"}
        assert set(data["observation"]) == OBS_KEYS
        assert data["observation"]["stdout"] == "" and data["observation"]["exit_code"] == 0
        assert data["done"] is False
        assert data["metadata"] == data["observation"]["metadata"]

        step = await s.request({"type": "step", "data": {"code": "x = 41"}})
        assert step["type"] == "observation"
        assert set(step["data"]["observation"]) == OBS_KEYS
        assert step["data"]["observation"]["exit_code"] == 0
        assert step["data"]["metadata"]["execution"]["status"] == "ok"

        step = await s.step("print(x + 1)")
        assert step["observation"]["stdout"] == "42\n"
        assert step["observation"]["stderr"] == ""
        assert step["done"] is False

        state = await s.request({"type": "state"})
        assert state["type"] == "state"
        assert state["data"]["episode_id"] == "ep-1"
        assert state["data"]["step_count"] == 2
        assert state["data"]["last_exit_code"] == 0
        assert state["data"]["backend"] == live_server.settings.backend
        assert state["data"]["policy"] == live_server.settings.policy


async def test_error_and_metadata_in_action(live_server, ws_session) -> None:
    async with ws_session(live_server) as s:
        await s.reset()
        # OpenEnv's GenericEnvClient sends the action's `metadata`; it must be accepted.
        reply = await s.request({"type": "step", "data": {"code": "1/0", "metadata": {"k": 1}}})
        obs = reply["data"]["observation"]
        assert obs["exit_code"] != 0
        execution = obs["metadata"]["execution"]
        assert execution["status"] == "error"
        assert execution["exception"]["type"] == "ZeroDivisionError"
        assert "ZeroDivisionError" in obs["stderr"]
        assert (await s.state())["last_exit_code"] == obs["exit_code"]


async def test_step_without_reset_and_reset_clears(live_server, ws_session) -> None:
    async with ws_session(live_server) as s:
        assert (await s.step("y = 5; print(y)"))["observation"]["stdout"] == "5\n"
        first = (await s.state())["episode_id"]
        assert first
        await s.reset()
        assert (await s.state())["episode_id"] != first
        obs = (await s.step("print('y' in globals())"))["observation"]
        assert obs["stdout"] == "False\n"


async def test_sessions_are_isolated(live_server, ws_session) -> None:
    async with ws_session(live_server) as a, ws_session(live_server) as b:
        await a.reset()
        await b.reset()
        await a.step("secret = 'a'")
        obs = (await b.step("print(secret)"))["observation"]
        assert obs["exit_code"] != 0 and "NameError" in obs["stderr"]
        assert (await a.step("print(secret)"))["observation"]["stdout"] == "a\n"
        assert (await a.state())["episode_id"] != (await b.state())["episode_id"]


def _assert_error(reply: dict, code: str) -> dict:
    assert reply["type"] == "error", reply
    assert reply["data"]["code"] == code, reply
    assert reply["data"]["message"]
    return reply["data"]


async def test_bad_messages_get_error_frames_and_session_survives(live_server, ws_session) -> None:
    async with ws_session(live_server) as s:
        await s.reset()
        await s.step("x = 41")

        _assert_error(await s.request("this is not json"), "INVALID_JSON")
        _assert_error(await s.request("{\"type\": "), "INVALID_JSON")
        err = _assert_error(await s.request({"type": "bogus"}), "UNKNOWN_TYPE")
        assert err["message"] == "Unknown message type: bogus"
        _assert_error(await s.request({"data": {}}), "UNKNOWN_TYPE")
        _assert_error(await s.request([1, 2]), "VALIDATION_ERROR")

        err = _assert_error(await s.request({"type": "step", "data": {}}), "VALIDATION_ERROR")
        assert [(e["type"], e["loc"]) for e in err["errors"]] == [("missing", ["code"])]
        err = _assert_error(await s.request({"type": "step", "data": {"code": "1", "cmd": "ls"}}),
                            "VALIDATION_ERROR")
        assert [(e["type"], e["loc"]) for e in err["errors"]] == [("extra_forbidden", ["cmd"])]
        err = _assert_error(await s.request({"type": "step", "data": {"code": 5}}), "VALIDATION_ERROR")
        assert err["errors"][0]["loc"] == ["code"]
        _assert_error(await s.request({"type": "step"}), "VALIDATION_ERROR")
        _assert_error(await s.request({"type": "step", "data": "print(1)"}), "VALIDATION_ERROR")
        _assert_error(await s.request({"type": "state", "extra": 1}), "VALIDATION_ERROR")
        _assert_error(await s.request({"type": "step", "data": {"code": "1"}, "timeout_s": -1}),
                      "VALIDATION_ERROR")

        # the namespace survived every bad message
        obs = (await s.step("print(x + 1)"))["observation"]
        assert obs["stdout"] == "42\n"
        assert (await s.state())["step_count"] == 2


async def test_huge_message_is_refused_by_the_transport_and_the_server_goes_on(live_server, ws_session) -> None:
    """A frame above max_message_bytes is refused from its header (close 1009, RFC 6455's
    "message too big"), never buffered; other sessions and new ones go on."""
    limit = live_server.settings.max_message_bytes
    async with ws_session(live_server) as other, ws_session(live_server) as s:
        await other.step("y = 1")
        await s.reset()
        await s.step("x = 41")
        huge = json.dumps({"type": "step", "data": {"code": "#" + "x" * limit}})
        with pytest.raises(ConnectionClosed) as closed:  # while still sending, or at the next read
            await s.send(huge)
            await s.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert (await other.step("print(y)"))["observation"]["stdout"] == "1\n"
    async with ws_session(live_server) as s:
        await s.step("x = 41")
        # a large message below the limit is fine (above websockets' default 1 MiB frame limit)
        size = min(limit // 2, 2 << 20)
        code = "s = '" + "a" * size + "'\nprint(len(s), x)"
        assert (await s.step(code))["observation"]["stdout"] == f"{size} 41\n"


async def test_bad_reset_options(live_server, ws_session) -> None:
    async with ws_session(live_server) as s:
        await s.reset()
        _assert_error(await s.request({"type": "reset", "data": {"seed": -1}}), "VALIDATION_ERROR")
        err = _assert_error(await s.request({"type": "reset", "data": {"policy": "no-such-policy"}}),
                            "VALIDATION_ERROR")
        assert err["error_code"] == "policy_not_found"
        assert (await s.step("print(2 + 2)"))["observation"]["stdout"] == "4\n"


async def test_binary_frame_is_read_as_utf8_json(live_server, ws_session) -> None:
    async with ws_session(live_server) as s:
        reply = await s.request(json.dumps({"type": "state"}).encode())
        assert reply["type"] == "state"


async def test_mcp_over_ws_uses_the_session(live_server, ws_session) -> None:
    async with ws_session(live_server) as s:
        await s.reset()
        await s.step("x = 41")
        reply = await s.request({"type": "mcp", "data": {"jsonrpc": "2.0", "id": 1,
                                                          "method": "tools/list"}})
        assert reply["type"] == "mcp" and reply["data"]["id"] == 1
        assert "run_python" in [t["name"] for t in reply["data"]["result"]["tools"]]
        reply = await s.request({"type": "mcp", "data": {
            "jsonrpc": "2.0", "id": "c", "method": "tools/call",
            "params": {"name": "run_python", "arguments": {"code": "print(x + 1)"}}}})
        result = reply["data"]["result"]
        assert result["content"][0] == {"type": "text", "text": "42\n"}
        assert result["isError"] is False
        reply = await s.request({"type": "mcp", "data": {"jsonrpc": "2.0", "id": 2, "method": "nope"}})
        assert reply["data"]["error"]["code"] == -32601
        reply = await s.request({"type": "mcp", "data": {"id": 3}})
        assert reply["data"]["error"]["code"] == -32600
        _assert_error(await s.request({"type": "mcp"}), "VALIDATION_ERROR")


async def test_close_ends_session_and_frees_slot(live_server, ws_session, wait_active) -> None:
    await wait_active(live_server, 0)
    async with ws_session(live_server) as s:
        await s.reset()
        await wait_active(live_server, 1)
        await s.send({"type": "close"})
        with pytest.raises(ConnectionClosed) as info:
            await s.recv()  # no reply: the server closes the socket
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000
    await wait_active(live_server, 0)


async def test_disconnect_closes_episode(live_server, ws_session, wait_active) -> None:
    await wait_active(live_server, 0)
    async with ws_session(live_server) as s:
        await s.reset()
        await s.step("z = 1")
        await wait_active(live_server, 1)
    await wait_active(live_server, 0)


async def test_disconnect_during_step_frees_slot(live_server, ws_session, wait_active) -> None:
    """Leaving mid-step cancels the step: the slot frees long before the code would finish."""
    await wait_active(live_server, 0)
    async with ws_session(live_server) as s:
        await s.reset()
        await s.send({"type": "step", "data": {"code": "import time; time.sleep(60)"},
                      "timeout_s": 120})
        await wait_active(live_server, 1)
    await wait_active(live_server, 0, timeout_s=8)  # the policy would let it run for 10 s


async def test_undecodable_output_does_not_break_the_reply(live_server, ws_session) -> None:
    async with ws_session(live_server) as s:
        code = ("import sys\nprint('lone \\udcff surrogate')\nsys.stdout.flush()\n"
                "sys.stdout.buffer.write(b'bad \\xff\\xfe bytes\\n')\nsys.stdout.flush()\nprint('end')")
        obs = (await s.step(code))["observation"]
        assert obs["stdout"].endswith("end\n")
        assert (await s.step("print('next')"))["observation"]["stdout"] == "next\n"
