"""Requests that try to bend the episode or the server: each gets a clear error, nothing is lost."""

from __future__ import annotations

import httpx

TASK = {"id": "inc", "prompt": "Write inc(x).",
        "tests": {"kind": "asserts", "asserts": ["assert inc(1) == 2"]}}


async def test_reset_options_cannot_overwrite_state_and_the_episode_survives(live_server, ws_session) -> None:
    async with ws_session(live_server) as session:
        await session.reset(episode_id="keep-me")
        await session.step("x = 5")
        for key, value in (("step_count", 99), ("backend", "none"), ("grading", {"reward": 1.0})):
            reply = await session.request({"type": "reset", "data": {key: value}})
            assert reply["type"] == "error" and reply["data"]["code"] == "VALIDATION_ERROR", reply
            assert key in reply["data"]["message"]
        state = await session.state()
        assert state["episode_id"] == "keep-me" and state["step_count"] == 1
        assert (await session.step("print(x)"))["observation"]["stdout"] == "5\n"


async def test_no_step_after_a_graded_submit(live_server, ws_session) -> None:
    async with ws_session(live_server) as session:
        await session.reset(task=TASK)
        graded = await session.request({"type": "step", "data": {"code": "def inc(x):\n    return x",
                                                                   "submit": True}})
        assert graded["data"]["done"] is True and graded["data"]["reward"] == 0.0
        again = await session.request({"type": "step", "data": {"code": "def inc(x):\n    return x + 1",
                                                                 "submit": True}})
        assert again["type"] == "error" and "reset" in again["data"]["message"]
        await session.reset(task=TASK)  # a new episode may try again
        fixed = await session.request({"type": "step", "data": {"code": "def inc(x):\n    return x + 1",
                                                                 "submit": True}})
        assert fixed["data"]["reward"] == 1.0


async def test_mcp_notification_over_ws_still_gets_one_reply(live_server, ws_session) -> None:
    async with ws_session(live_server) as session:
        reply = await session.request({"type": "mcp", "data": {"jsonrpc": "2.0",
                                                               "method": "notifications/initialized"}})
        assert reply == {"type": "mcp", "data": None}
        listed = await session.request({"type": "mcp", "data": {"jsonrpc": "2.0", "id": 7,
                                                                "method": "tools/list"}})
        assert listed["data"]["id"] == 7  # replies stay paired with requests


async def test_chunked_http_body_over_the_limit_is_refused(live_server_factory) -> None:
    server = live_server_factory(max_message_bytes=4096)

    async def chunks():  # no content-length: only counting the bytes received can stop it
        yield b'{"action": {"code": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}}'

    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        response = await http.post("/step", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert (await http.get("/health")).json() == {"status": "healthy"}
