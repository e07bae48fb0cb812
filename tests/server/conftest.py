"""Helpers for the server tests: raw `/ws` sessions (the `websockets` client, not ours).

The servers themselves come from `tests/conftest.py` (`live_server`, `live_server_factory`):
real uvicorn on loopback with the backend from `SANDBOX_ENV_BACKEND` (default: jupyter).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

REPLY_TIMEOUT_S = 60.0  # bounds every reply so that a broken server fails a test, never hangs it


class Session:
    """One raw `/ws` connection with request/reply helpers."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, frame: dict[str, Any] | list[Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), REPLY_TIMEOUT_S))
        return reply

    async def request(self, frame: dict[str, Any] | list[Any] | str | bytes) -> dict[str, Any]:
        await self.send(frame)
        return await self.recv()

    async def reset(self, **data: Any) -> dict[str, Any]:
        reply = await self.request({"type": "reset", "data": data})
        assert reply["type"] == "observation", reply
        return reply["data"]

    async def step(self, code: str, **extra: Any) -> dict[str, Any]:
        reply = await self.request({"type": "step", "data": {"code": code}, **extra})
        assert reply["type"] == "observation", reply
        return reply["data"]

    async def state(self) -> dict[str, Any]:
        reply = await self.request({"type": "state"})
        assert reply["type"] == "state", reply
        return reply["data"]


def ws_url(server: Any) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws"


@asynccontextmanager
async def _ws_session(server: Any) -> AsyncIterator[Session]:
    async with connect(ws_url(server), max_size=None, open_timeout=10, close_timeout=5,
                       additional_headers=server.headers) as ws:
        yield Session(ws)


async def _wait_active(server: Any, expected: int, timeout_s: float = 20.0) -> None:
    """Wait until the server counts `expected` open episodes (closing happens after the reply)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        while True:
            active = (await http.get("/readyz")).json()["active_sessions"]
            if active == expected:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{active} sessions open, expected {expected}")
            await asyncio.sleep(0.05)


@pytest.fixture
def ws_session() -> Callable[[Any], AbstractAsyncContextManager[Session]]:
    """`async with ws_session(server) as s:` opens one raw `/ws` session."""
    return _ws_session


@pytest.fixture
def wait_active() -> Callable[..., Any]:
    return _wait_active
