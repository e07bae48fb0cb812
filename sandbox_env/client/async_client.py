"""Async client for a sandbox-env server, over its WebSocket `/ws` (one episode per connection)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sandbox_env.client._base import (
    ActionLike,
    StepResult,
    auth_headers,
    error_from_frame,
    http_url,
    to_action,
    ws_url,
)
from sandbox_env.client._dual import DualMode, dual
from sandbox_env.errors import CapacityError, ClientError, ConnectionLostError, SandboxEnvError, error_from_dict
from sandbox_env.models import BatchLine, EpisodeState, GradeRequest, Grading, ResetRequest

if TYPE_CHECKING:
    from sandbox_env.client.sync_client import SyncSandboxEnv

# Constructor arguments of OpenEnv's EnvClient that AutoEnv or OpenEnv users may pass us.
_OPENENV_KWARGS = {"provider", "mode", "websocket_ping_interval_s", "websocket_ping_timeout_s"}
# How much longer than a step's own time limit its reply may take (kernel restart, transport).
_REPLY_MARGIN_S = 15.0
_GRADING_REPLY_TIMEOUT_S = 3600.0


class SandboxEnv(DualMode):
    """Async client: one WebSocket, one episode, strictly one request in flight.

    Args:
        base_url: Server root, `http(s)://` or `ws(s)://`; `/ws` is appended.
        connect_timeout_s: Timeout of one connection attempt (TCP + WebSocket handshake).
        message_timeout_s: How long to wait for the reply to one request. A step whose code
            runs longer than this fails with `ClientError` and loses its episode.
        max_message_size_mb: Largest reply accepted.
        connect_retries: Extra connection attempts, with a short backoff, when the server is
            unreachable (e.g. still starting). Requests themselves are never retried.
        token: The server's token (sent as `Authorization: Bearer <token>`); default: the
            `SANDBOX_ENV_TOKEN` environment variable. `""` sends none.
        headers: Extra HTTP headers for the WebSocket handshake and HTTP calls; an
            `Authorization` header here wins over `token`.
        **kwargs: OpenEnv `EnvClient` arguments (`provider`, `mode`, `websocket_ping_*`), so
            `AutoEnv.from_env("sandbox", base_url=...)` can build this class.

    Example:
        >>> async with SandboxEnv("http://127.0.0.1:8000") as env:  # doctest: +SKIP
        ...     await env.reset()
        ...     await env.step("x = 41")
        ...     result = await env.step("print(x + 1)")
        >>> result.observation.stdout  # doctest: +SKIP
        '42\\n'
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, connect_timeout_s: float = 10.0,
                 message_timeout_s: float = 60.0, max_message_size_mb: float = 100.0,
                 connect_retries: int = 3, token: str | None = None,
                 headers: dict[str, str] | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - _OPENENV_KWARGS
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
        if kwargs.get("provider") is not None:
            raise ValueError("SandboxEnv does not start servers: pass provider=None and a base_url")
        self.base_url = base_url.rstrip("/")
        self.ws_url = ws_url(base_url)
        self.connect_timeout_s = connect_timeout_s
        self.message_timeout_s = message_timeout_s
        self.max_message_bytes = int(max_message_size_mb * 1024 * 1024)
        self.connect_retries = connect_retries
        self._headers = auth_headers(token, headers)
        self._ping_interval = kwargs.get("websocket_ping_interval_s", 20.0)
        self._ping_timeout = kwargs.get("websocket_ping_timeout_s", 20.0)
        self._ws: ClientConnection | None = None
        self._lost: str | None = None  # why the previous connection (and its episode) ended
        self._lock = asyncio.Lock()

    # -- public API ---------------------------------------------------------------------------

    @dual
    async def connect(self) -> SandboxEnv:
        """Open the WebSocket (done implicitly by the first request)."""
        async with self._lock:
            await self._ensure_connected(reconnect=True)
        return self

    @dual
    async def reset(self, **kwargs: Any) -> StepResult:
        """Start a new episode with a clean interpreter; kwargs are reset options (e.g. `policy`).

        After a lost connection, reset opens a new one, since the old episode is gone anyway.
        """
        ResetRequest.model_validate(kwargs)  # fail before sending, as the embedded env does
        data = await self._request({"type": "reset", "data": kwargs}, "observation", reconnect=True)
        return StepResult.from_wire(data)

    @dual
    async def step(self, action: ActionLike, *, timeout_s: float | None = None, **kwargs: Any) -> StepResult:
        """Run code in the episode's interpreter.

        Args:
            action: A `CodeAction`, its dict form, or a string of code.
            timeout_s: Wall-time limit of this step; defaults to the policy's. The reply is
                awaited for at least this long plus a margin, even above `message_timeout_s`.
            **kwargs: Extra action fields, e.g. `metadata={...}`; unknown fields are rejected.
        """
        payload = to_action(action, **kwargs).model_dump(mode="json")
        message: dict[str, Any] = {"type": "step", "data": payload}
        reply_timeout_s = self.message_timeout_s
        if timeout_s is not None:
            message["timeout_s"] = timeout_s  # our extension of OpenEnv's step frame
            reply_timeout_s = max(reply_timeout_s, timeout_s + _REPLY_MARGIN_S)
        if payload.get("submit"):
            # Grading runs every test under its own limit: minutes for a large suite. Keepalive
            # pings still notice a dead server; giving up early would lose the episode.
            reply_timeout_s = max(reply_timeout_s, _GRADING_REPLY_TIMEOUT_S)
        data = await self._request(message, "observation", reply_timeout_s=reply_timeout_s)
        return StepResult.from_wire(data)

    @dual
    async def state(self) -> EpisodeState:
        """The episode's id, step count, last exit code, backend and policy."""
        data = await self._request({"type": "state"}, "state")
        return EpisodeState.model_validate(data)

    def close(self) -> Any:
        """End the episode and close the connection; calling it twice is harmless.

        Awaitable inside an event loop; blocking outside one (then it also stops the private
        loop thread that blocking calls ran on).
        """
        coro = self._close()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._blocking_loop is None:
                coro.close()  # never used in blocking mode: nothing to close from here
                return None
            self._run_blocking(coro)
            self._stop_blocking_loop()
            return None
        return coro

    async def _close(self) -> None:
        ws, self._ws, self._lost = self._ws, None, None
        if ws is None:
            return
        # Only say goodbye when no request is in flight: a concurrent close must not
        # interleave a frame with a pending reply.
        if not self._lock.locked():
            with contextlib.suppress(ConnectionClosed, OSError):
                await ws.send(json.dumps({"type": "close"}))
        with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
            await ws.close()

    @dual
    async def grade(self, submission: str, *, task: Any = None, task_id: str | None = None,
                    policy: str | None = None, reward: str | None = None,
                    timeout_s: float | None = None) -> Grading:
        """Grade `submission` against a task (inline `task`, or a server `task_id`), over HTTP
        `POST /grade`: no episode needed. An infrastructure failure comes back as a `Grading`
        with `status="infra_error"`, `reward=None`, `retryable=True`; service errors raise."""
        import httpx  # only the HTTP helpers need it

        from sandbox_env.client.grading import post_grade

        if hasattr(task, "model_dump"):
            task = task.model_dump(mode="json")
        request = GradeRequest(submission=submission, task=task, task_id=task_id, policy=policy, reward=reward)
        url = f"{http_url(self.base_url)}/grade"
        async with httpx.AsyncClient(timeout=timeout_s or max(self.message_timeout_s, 600.0),
                                     trust_env=not _is_loopback(url), headers=self._headers) as http:
            return await post_grade(http, url, request)

    async def grade_batch(self, items: Iterable[Any], *, policy: str | None = None, reward: str | None = None,
                          parallel: int | None = None, timeout_s: float | None = None) -> AsyncIterator[BatchLine]:
        """Grade many submissions in one `POST /grade/batch`; yields a `BatchLine` per item as the
        server finishes it (`type` "result" with its `grading`, or "error": a task or reward the
        server refuses), then the `summary`. Items: dicts (or `BatchItem`s) with `submission` and
        `task_id` or `task`, optionally `reward` and `id`. `timeout_s`: the longest wait for the
        next line. Breaking out of the loop cancels the rest on the server."""
        import httpx  # only the HTTP helpers need it

        from sandbox_env.client.batch import batch_request, stream_batch

        request = batch_request(items, policy=policy, reward=reward, parallel=parallel)
        url = f"{http_url(self.base_url)}/grade/batch"
        timeout = httpx.Timeout(timeout_s or max(self.message_timeout_s, 600.0), connect=self.connect_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, trust_env=not _is_loopback(url), headers=self._headers) as http:
            lines = stream_batch(http, url, request)
            try:
                async for line in lines:
                    yield line
            finally:
                await lines.aclose()

    @dual
    async def health(self) -> dict[str, Any]:
        """`GET /health` over HTTP; raises `ClientError` when the server is not healthy."""
        import httpx  # only this helper needs it

        url = f"{http_url(self.base_url)}/health"
        try:
            async with httpx.AsyncClient(timeout=self.connect_timeout_s,
                                         trust_env=not _is_loopback(url)) as http:
                response = await http.get(url)
                response.raise_for_status()
                return dict(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            raise ClientError(f"health check of {url} failed: {exc}", url=url) from exc

    def sync(self) -> SyncSandboxEnv:
        """A blocking wrapper with the same methods, driving this client on its own loop thread."""
        from sandbox_env.client.sync_client import SyncSandboxEnv

        return SyncSandboxEnv(self)

    async def __aenter__(self) -> SandboxEnv:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __enter__(self) -> SandboxEnv:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.connect()  # blocking outside an event loop, as OpenEnv >= 0.4 clients
            return self
        raise TypeError("inside an event loop use `async with SandboxEnv(...)`, "
                        "or `with SandboxEnv(...).sync()` for blocking calls")

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- transport ----------------------------------------------------------------------------

    async def _request(self, message: dict[str, Any], expect: str, *, reconnect: bool = False,
                       reply_timeout_s: float | None = None) -> dict[str, Any]:
        async with self._lock:
            ws = await self._ensure_connected(reconnect=reconnect)
            try:
                with contextlib.suppress(ConnectionClosed):
                    # A server that refused the session (capacity) sent an error frame and
                    # closed; the frame is still buffered, so read it instead of failing here.
                    await ws.send(json.dumps(message))
                frame = await self._receive(ws, reply_timeout_s or self.message_timeout_s)
            except asyncio.CancelledError:
                # The reply may still come and would answer the next request: give up the socket.
                self._abandon(ws, "a request was cancelled before its reply arrived")
                raise
            if frame.get("type") == "error":
                error = error_from_frame(dict(frame.get("data") or {}))
                if isinstance(error, CapacityError):
                    await self._drop(None)  # refused before any episode existed: nothing is lost
                raise error
            if frame.get("type") != expect:
                await self._drop(f"unexpected {frame.get('type')!r} frame")
                raise ClientError(f"expected a {expect!r} frame, got {frame.get('type')!r}")
            return dict(frame.get("data") or {})

    async def _receive(self, ws: ClientConnection, timeout_s: float) -> dict[str, Any]:
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout_s)
        except TimeoutError as exc:
            # No request ids on this protocol: the late reply would answer the next request
            # (OpenEnv issue #1143), so the socket, and with it the episode, is given up.
            await self._drop(f"no reply within {timeout_s} s")
            raise ClientError(f"no reply from {self.ws_url} within {timeout_s} s; "
                              "the connection was closed and the episode is lost",
                              timeout_s=timeout_s) from exc
        except ConnectionClosed as exc:
            self._ws, self._lost = None, f"{_CLOSED_BY_SERVER} ({exc})"
            raise ConnectionLostError(f"connection to {self.ws_url} closed: {exc}; the episode is lost, "
                                      "reset() starts a new one") from exc
        try:
            frame = json.loads(raw)
        except ValueError as exc:
            await self._drop("the server sent invalid JSON")
            raise ClientError(f"invalid JSON from server: {exc}") from exc
        if not isinstance(frame, dict):
            await self._drop("the server sent a non-object frame")
            raise ClientError("the server sent a frame that is not a JSON object")
        return frame

    async def _ensure_connected(self, *, reconnect: bool) -> ClientConnection:
        if self._ws is not None and self._ws.state is websockets.State.OPEN:
            return self._ws
        if self._ws is not None:
            self._ws, self._lost = None, _CLOSED
        if self._lost and not reconnect:
            # The server (or a farm's replica) went away: retryable, with a reset, there or elsewhere.
            lost = ConnectionLostError if self._lost == _CLOSED or self._lost.startswith(_CLOSED_BY_SERVER) else ClientError
            raise lost(f"the episode is lost: {self._lost}; call reset() to start a new one")
        self._ws = await self._open()
        self._lost = None
        return self._ws

    async def _open(self) -> ClientConnection:
        delay = 0.1
        last_error: Exception | None = None
        for attempt in range(self.connect_retries + 1):
            try:
                return await websockets.connect(
                    self.ws_url, open_timeout=self.connect_timeout_s, max_size=self.max_message_bytes,
                    ping_interval=self._ping_interval, ping_timeout=self._ping_timeout,
                    close_timeout=2.0, additional_headers=self._headers,
                    proxy=None if _is_loopback(self.ws_url) else True,
                )
            except InvalidStatus as exc:
                # 5xx is often a proxy in front of a server still starting: retry; 4xx will not heal.
                status = exc.response.status_code
                if status in (401, 403):
                    raise _refused(self.ws_url, exc.response.status_code, exc.response.body) from exc
                if status < 500:
                    raise ClientError(f"{self.ws_url} refused the WebSocket: HTTP {status}",
                                      status=status) from exc
                last_error = exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                last_error = exc
            if attempt < self.connect_retries:
                await asyncio.sleep(delay)
                delay *= 2
        raise ClientError(f"cannot connect to {self.ws_url}: {last_error}", url=self.ws_url) from last_error

    async def _drop(self, reason: str | None) -> None:
        ws, self._ws, self._lost = self._ws, None, reason
        if ws is not None:
            with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
                await ws.close()

    def _abandon(self, ws: ClientConnection, reason: str) -> None:
        # Cannot await inside cancellation; close in the background, keeping a reference.
        self._ws, self._lost = None, reason
        task = asyncio.get_running_loop().create_task(ws.close())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[Any]] = set()
_CLOSED = "the connection was closed (keepalive or server shutdown)"
_CLOSED_BY_SERVER = "the server closed the connection"


def _refused(url: str, status: int, body: bytes | None) -> SandboxEnvError:
    """The server's own 401/403 error (AuthError, ForbiddenError), or a ClientError."""
    try:
        detail = json.loads(body or b"{}").get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, dict) and detail.get("code") in ("unauthorized", "forbidden", "host_not_allowed",
                                                           "origin_not_allowed"):
        code = detail["code"] if detail["code"] == "unauthorized" else "forbidden"
        return error_from_dict({**detail, "code": code, "reason": detail["code"], "url": url})
    return ClientError(f"{url} refused the WebSocket: HTTP {status}", status=status)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
