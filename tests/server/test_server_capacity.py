"""A full server answers with a clear capacity error on every transport, and never hangs."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from websockets.exceptions import ConnectionClosed


async def test_capacity_reached_then_freed(live_server_factory, ws_session, wait_active) -> None:
    server = live_server_factory(max_sessions=2, pool_size=1)
    async with ws_session(server) as a, ws_session(server) as b:
        # a reply proves each session holds its slot
        assert (await a.request({"type": "state"}))["type"] == "state"
        assert (await b.request({"type": "state"}))["type"] == "state"

        async with ws_session(server) as c:
            frame = await c.recv()
            assert frame == {"type": "error", "data": {
                "message": frame["data"]["message"], "code": "CAPACITY_REACHED",
                "active_sessions": 2, "max_sessions": 2}}
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(c.ws.recv(), 10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013

        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=server.headers) as http:
            reply = await http.post("/step", json={"action": {"code": "print(1)"}})
            assert reply.status_code == 503
            assert reply.headers["retry-after"]
            assert reply.json()["detail"]["code"] == "capacity_reached"
            assert reply.json()["detail"]["max_sessions"] == 2
            assert (await http.post("/reset")).status_code == 503
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["active_sessions"] == 2
            assert ready.json()["status"] == "full"
            assert (await http.get("/health")).json() == {"status": "healthy"}
            rpc = (await http.post("/mcp", json={
                "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "run_python", "arguments": {"code": "1"}}})).json()
            assert rpc["error"]["code"] == -32000
            assert rpc["error"]["data"]["code"] == "capacity_reached"
            metrics = (await http.get("/metrics")).text
            # the refused /ws session, /step, /reset and the MCP call
            assert "sandbox_env_capacity_rejections_total 4.0" in metrics

        # the sessions that got in still work; once one leaves, a newcomer gets its slot
        assert (await a.step("print('a')"))["observation"]["stdout"] == "a\n"
        await a.send({"type": "close"})
        await wait_active(server, 1)
        async with ws_session(server) as d:
            assert (await d.step("print('d')"))["observation"]["stdout"] == "d\n"
        assert (await b.step("print('b')"))["observation"]["stdout"] == "b\n"


async def test_idle_session_is_closed_and_frees_its_slot(live_server_factory, ws_session,
                                                         wait_active) -> None:
    server = live_server_factory(max_sessions=1, pool_size=1, session_timeout_s=3.0)
    async with ws_session(server) as s:
        assert (await s.step("print(1)"))["observation"]["stdout"] == "1\n"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(s.ws.recv(), 15)  # the server ends the idle session
    await wait_active(server, 0)
    async with ws_session(server) as s:
        assert (await s.step("print(2)"))["observation"]["stdout"] == "2\n"
