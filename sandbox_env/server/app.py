"""The FastAPI application: `create_app()`, the lazily built module-level `app`, and `main()`.

`uvicorn sandbox_env.server.app:app` works (the module builds `app` on first access from
`SANDBOX_ENV_*` settings), and `main()` follows OpenEnv's `server = "<pkg>.server.app:main"`
script convention. Everyone who runs uvicorn should pass `**uvicorn_kwargs(settings)` so that
WebSocket frame limits and keepalives match what the protocol handler expects.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox_env._version import __version__
from sandbox_env.errors import ConfigError, SandboxEnvError
from sandbox_env.manager import EpisodeManager
from sandbox_env.policy import available_policies
from sandbox_env.server import batch, farm_view, mcp, routes, sandboxfusion, watch, web, ws
from sandbox_env.server.auth import TokenTable, admin_token, build_table
from sandbox_env.server.farm import Farm
from sandbox_env.server.guard import Guard, HostPolicy
from sandbox_env.server.json_limits import MAX_JSON_NODES, json_cost_ok
from sandbox_env.server.metrics import ServerMetrics
from sandbox_env.server.reaper import Reaper
from sandbox_env.server.transport import http_protocol
from sandbox_env.settings import Settings

log = logging.getLogger(__name__)

# OpenAPI `info.version` is the OpenEnv HTTP contract version ("1.x" is the profile that
# `openenv validate` recognises), not the package version; /metadata reports the latter.
OPENENV_API_VERSION = "1.0.0"
DRAIN_MARGIN_S = 5.0  # beyond a step's own limit: kernel round trip, the reply
WS_MAX_QUEUE = 4  # frames the transport holds for the app; the app reads ahead on its own (ws._Inbox)


def uvicorn_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run`/`uvicorn.Config` matching these settings.

    The WebSocket transport refuses a frame larger than `max_message_bytes` from its header, before
    reading it (close code 1009), and queues few frames; request heads must arrive within
    `header_timeout_s` (see `transport`); idle keep-alive connections close after
    `keepalive_timeout_s`; above `max_connections` connections or requests, uvicorn answers 503.
    """
    return {
        "host": settings.host,
        "port": settings.port,
        "http": http_protocol(settings.header_timeout_s, settings.max_header_bytes, settings.body_timeout_s),
        "ws_max_size": settings.max_message_bytes,
        # No compression: a few KB of deflated frame would expand to max_message_bytes of JSON
        # that the loop then parses (and keeps per connection): the cost must track what is sent.
        "ws_per_message_deflate": False,
        "ws_max_queue": WS_MAX_QUEUE,
        "ws_ping_interval": 20.0,
        "ws_ping_timeout": 20.0,
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "limit_concurrency": settings.max_connections,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_graceful_shutdown": 10,
        "lifespan": "on",
        "proxy_headers": False,
    }


class BodySizeLimit:
    """Reject HTTP bodies larger than the limit with 413 (announced ones before reading them,
    chunked ones as soon as the bytes received pass the limit), and JSON bodies holding more
    values than the server parses on its loop (`json_limits`) with 422. The body, bounded by the
    limit anyway, is read here and handed on whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(scope, receive, send, 413, f"request body larger than {self.max_bytes} bytes",
                                   "payload_too_large")
                return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, f"request body larger than {self.max_bytes} bytes",
                                   "payload_too_large")
                return
        body = b"".join(chunks)
        if scope["path"] != "/mcp" and not json_cost_ok(body):  # /mcp answers in JSON-RPC itself
            await self._refuse(scope, receive, send, 422, f"request body holds more than {MAX_JSON_NODES} JSON values",
                               "invalid_request")
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: the disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, code: str) -> None:
        response = routes.JSONResponse({"detail": {"message": message, "code": code}}, status_code=status)
        await response(scope, receive, send)


class CloseOnRefusal:
    """A refused request (401, 403, 415) ends its connection: its body, maybe trickled on purpose
    by someone without a token, is never waited for, and the slot is free at once. So does a
    GET, HEAD, OPTIONS or DELETE that announces a body (the probes take no token: without this,
    a body trickled after their answer would hold the connection). (Not 413: a client still
    sending a big body would get a reset instead of the answer; `body_timeout_s` bounds it.)"""

    REFUSED = frozenset({401, 403, 415})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        bodiless = scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and any(
            name in (b"content-length", b"transfer-encoding") and value not in (b"0",)
            for name, value in scope.get("headers", ()))

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and (bodiless or message["status"] in self.REFUSED):
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)


def _token_table(app: FastAPI, settings: Settings) -> TokenTable | None:
    """The tokens the Guard accepts; without auth, None, allowed on loopback binds only unless
    `allow_remote_no_auth` says otherwise."""
    if not settings.auth:
        if not is_loopback_bind(settings.host) and not settings.allow_remote_no_auth:
            raise ConfigError(f"refusing to serve {settings.host} without authentication: "
                              "bind to 127.0.0.1, or also pass --allow-remote-no-auth")
        log.warning("authentication is OFF: anyone who can reach %s:%s runs code here",
                    settings.host, settings.port)
        app.state.admin_token = None
        return None
    token, generated = admin_token(settings)
    app.state.admin_token = token
    if generated:  # nobody else knows it yet: say where to find the server
        log.warning("%s", banner(settings, token))
    return build_table(settings, token)


def is_loopback_bind(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def banner(settings: Settings, token: str | None, *, reveal: bool = True) -> str:
    """What `sandbox-env serve` prints at start: ready-to-paste URLs, as Jupyter does. A token
    the operator chose (`SANDBOX_ENV_TOKEN`, `token_file`) is not repeated into logs."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    root = (settings.public_url or f"http://{host}:{settings.port}").rstrip("/")  # a farm: its gateway
    if token is None:
        return f"sandbox-env is serving WITHOUT authentication: {root}/web"
    shown = token if reveal else "<your token>"
    replica = settings.replica_name()
    what = f"sandbox-env replica {replica} is serving the farm at" if replica else "sandbox-env is serving at"
    return (f"{what} {root}\n"
            f"    open the episode page:  {root}/web?token={shown}\n"
            f"    clients, OpenEnv, TRL:  export SANDBOX_ENV_TOKEN={shown}\n"
            f"                            (or send the header 'Authorization: Bearer <token>')")


def drain_grace(settings: Settings, manager: EpisodeManager) -> float:
    """How long a drain waits for work in flight: `drain_grace_s`, but never less than the longest
    step limit of the policies clients may use (plus a margin), so every step can finish."""
    names = settings.allowed_policies or [manager.default_policy.name]
    if "*" in names:
        names = available_policies()
    longest = manager.default_policy.timeout_s
    for name in names:
        try:
            longest = max(longest, manager.policy(name).timeout_s)
        except SandboxEnvError:
            continue
    floor = longest + DRAIN_MARGIN_S
    if settings.drain_grace_s is not None and settings.drain_grace_s < floor:
        log.warning("drain_grace_s=%s is below the longest step limit; using %s s", settings.drain_grace_s, floor)
    return max(settings.drain_grace_s or 0.0, floor)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; its lifespan owns the EpisodeManager (kernel pools start there)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = EpisodeManager(settings)
        # Before any kernel exists: if this process dies without the shutdown below, it sweeps.
        reaper = Reaper.start(backend=settings.backend, workdir_root=settings.workdir_root) \
            if settings.reaper else None
        try:
            await manager.start()
        except BaseException:
            await manager.shutdown()  # a half-started backend must not leave kernels behind
            if reaper is not None:
                reaper.stand_down()
            raise
        app.state.manager = manager
        app.state.drain_grace_s = drain_grace(settings, manager)
        log.info("sandbox-env %s serving backend=%s policy=%s max_sessions=%d", __version__,
                 settings.backend, settings.policy, settings.max_sessions)
        try:
            yield
        finally:
            app.state.draining.set()
            await app.state.mcp_sessions.close_all(manager)
            await manager.shutdown()
            app.state.manager = None
            if app.state.farm is not None:
                await app.state.farm.close()
            if reaper is not None:  # everything is closed: nothing for it to sweep
                await asyncio.to_thread(reaper.stand_down)

    extra: dict[str, Any] = {}
    if "max_body_size" in inspect.signature(FastAPI.__init__).parameters:
        extra["max_body_size"] = settings.max_message_bytes  # also bounds chunked bodies
    app = FastAPI(
        title="sandbox-env",
        version=OPENENV_API_VERSION,
        summary="Sandboxed Python episodes over OpenEnv's protocol",
        description=(f"sandbox-env {__version__}. Stateful episodes over the `/ws` WebSocket "
                     "(OpenEnv protocol); stateless `/reset` and `/step` over HTTP; MCP at `/mcp`."),
        lifespan=lifespan,
        **extra,
    )
    app.state.settings = settings
    app.state.manager = None
    app.state.draining = asyncio.Event()  # /ws sessions start no new request and close with 1001
    app.state.ws_sessions = 0
    app.state.drain_grace_s = settings.drain_grace_s or 0.0
    app.state.metrics = ServerMetrics(lambda: app.state.manager)
    app.state.mcp_sessions = mcp.McpSessions()
    app.state.farm = Farm(settings) if settings.farm_peers else None  # replicas behind a gateway
    app.state.event_streams = watch.StreamSlots(settings)  # /episodes/{id}/events, per tenant and in all
    app.add_exception_handler(SandboxEnvError, routes.sandbox_error_handler)
    app.add_exception_handler(RequestValidationError, routes.request_validation_handler)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_message_bytes)
    app.add_middleware(Guard, hosts=HostPolicy(settings.host, settings.allowed_hosts),
                       origins=settings.allowed_origins, tokens=_token_table(app, settings))
    app.add_middleware(CloseOnRefusal)  # outermost: sees the Guard's refusals too
    app.include_router(routes.router)
    app.include_router(batch.router)  # /grade/batch
    app.include_router(mcp.router)
    app.include_router(ws.router)
    app.include_router(web.router)
    app.include_router(sandboxfusion.router)  # /run_code, /submit
    app.include_router(watch.router)
    app.include_router(farm_view.router)
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # Built on first access so importing this module never starts anything.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Serve with settings from `SANDBOX_ENV_*` (the CLI `sandbox-env serve` has flags)."""
    from sandbox_env.server.serving import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
