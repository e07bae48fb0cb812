"""Running the app: uvicorn with a graceful drain in front of its shutdown.

On SIGTERM (or SIGINT, or `should_exit`), before uvicorn stops listening, the server drains:
`/readyz` answers 503, new sessions are refused (503 / CAPACITY_REACHED with error_code
`draining`, close 1013) and sessions start no new request, so a load balancer moves on; steps and
gradings in flight run to their end within `drain_grace_s` (at least the longest step limit of
the policies clients may use, plus a margin), and each WebSocket session is closed by the server
with 1001 ("going away", reason "server shutting down") right after its last reply. Only then
does uvicorn's own shutdown run (what is still open gets 1012) and the lifespan close every
kernel. A second SIGINT skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from sandbox_env.server.app import uvicorn_kwargs
from sandbox_env.settings import Settings

log = logging.getLogger(__name__)
DRAIN_POLL_S = 0.05
SESSIONS_CLOSE_S = 5.0  # after the last step: time for sessions to send their close frames


class Server(uvicorn.Server):
    """`uvicorn.Server` whose shutdown starts with `drain(app)`."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.sandbox_app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await drain(self.sandbox_app, lambda: self.force_exit)
        except Exception:  # the shutdown proper must run whatever happened here
            log.exception("draining failed; shutting down now")
        await super().shutdown(sockets)


async def drain(app: FastAPI, forced: Any = lambda: False) -> None:
    """Stop taking sessions and requests, wait for work in flight (within the grace); each /ws
    session closes with 1001 once its last reply is sent."""
    manager = app.state.manager
    draining: asyncio.Event = app.state.draining
    if manager is None or draining.is_set():
        return
    manager.draining = True
    draining.set()
    grace_s: float = app.state.drain_grace_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    busy = _busy(manager)
    if busy:
        log.info("draining: waiting up to %.0f s for %d steps or gradings in flight", grace_s, busy)
    while (busy := _busy(manager)) and loop.time() < deadline and not forced():
        await asyncio.sleep(DRAIN_POLL_S)
    if busy:
        log.warning("draining: %d steps or gradings still running after %.0f s; they are cut off",
                    busy, grace_s)
    deadline = loop.time() + SESSIONS_CLOSE_S
    while app.state.ws_sessions and loop.time() < deadline and not forced():
        await asyncio.sleep(DRAIN_POLL_S)


def _busy(manager: Any) -> int:
    return sum(1 for ep in list(manager.episodes.values()) if ep.busy) + manager.grading


def serve(app: FastAPI, settings: Settings, **options: Any) -> None:
    """Run `app` until SIGTERM/SIGINT, draining first; `options` go to `uvicorn.Config`."""
    config = uvicorn.Config(app, **{**uvicorn_kwargs(settings), **options})
    Server(config, app).run()
