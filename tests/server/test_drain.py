"""Draining seen from inside one process: a `live_server` stopped the way SIGTERM stops
`sandbox-env serve` (uvicorn's `should_exit`, then our drain before its shutdown).

The real signal on a real `serve` is in test_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from websockets.asyncio.client import connect


def rpc(method: str, **params) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


async def test_an_mcp_session_starts_no_step_while_the_server_drains(live_server_factory) -> None:
    """The finding: `tools/call` on an existing MCP session kept starting steps during the drain.
    It is refused like a new session on /ws: error_code `draining`, retryable."""
    server = live_server_factory(max_sessions=4, pool_size=2)
    ws_url = server.url.replace("http://", "ws://", 1) + "/ws"
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http, \
            connect(ws_url, additional_headers=server.headers, open_timeout=10) as busy:
        session = (await http.post("/mcp", json=rpc("openenv/session/create"))).json()["result"]["session_id"]
        call = rpc("tools/call", name="run_python", arguments={"code": "print('ran')"}, session_id=session)
        assert (await http.post("/mcp", json=call)).json()["result"]["content"][0]["text"] == "ran\n"
        # a step in flight keeps the drain waiting (until it ends at the policy's step limit)
        await busy.send(json.dumps({"type": "step", "data": {"code": "import time; time.sleep(600)"}}))
        deadline = time.monotonic() + 60
        while not any(e["busy"] for e in (await http.get("/episodes")).json()["episodes"]):
            assert time.monotonic() < deadline, "the step never started"
            await asyncio.sleep(0.05)

        server.server.should_exit = True  # what SIGTERM does
        while (await http.get("/readyz")).status_code != 503:
            assert time.monotonic() < deadline, "the server never drained"
            await asyncio.sleep(0.05)
        refused = (await http.post("/mcp", json=call)).json()
        assert "result" not in refused, refused
        assert refused["error"]["data"]["error_code"] == "draining" and refused["error"]["data"]["retryable"] is True
        assert (await http.get("/readyz")).json()["status"] == "draining"
