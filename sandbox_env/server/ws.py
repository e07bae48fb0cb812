"""The `/ws` session protocol: one episode per connection, OpenEnv's frames and error codes.

Requests are answered strictly in order, one reply each (`close` gets none), so a client that
pairs replies with requests by position stays in sync. No bad message ends the session; only
`close`, a disconnect or the idle timeout do, and each of them closes the episode.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandbox_env.errors import CapacityError, SandboxEnvError, clip_message
from sandbox_env.models import CodeAction, ResetRequest
from sandbox_env.server.auth import Tenant
from sandbox_env.server.guard import tenant_of
from sandbox_env.server.json_limits import NotJson, TooCostly, load_bounded
from sandbox_env.server.mcp import handle_jsonrpc
from sandbox_env.server.metrics import ServerMetrics, timed_step
from sandbox_env.server.routes import json_dumps, validation_errors

if TYPE_CHECKING:
    from sandbox_env.episode import Episode
    from sandbox_env.manager import EpisodeManager

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# WebSocket close codes (RFC 6455): normal, going away (idle, reaped, shutting down), policy
# violation (sent too much ahead), internal error, try again later (full or draining). The
# transport itself closes with 1009 a frame larger than max_message_bytes.
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION, CLOSE_INTERNAL, CLOSE_TRY_LATER = (
    1000, 1001, 1008, 1011, 1013)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResetMessage(_Message):
    type: Literal["reset"]
    data: dict[str, Any] = Field(default_factory=dict)


class StepMessage(_Message):
    type: Literal["step"]
    data: dict[str, Any]
    # Our extension (OpenEnv has no per-step timeout over WS); mirrors StepRequest.timeout_s.
    timeout_s: float | None = Field(default=None, gt=0)


class StateMessage(_Message):
    type: Literal["state"]


class CloseMessage(_Message):
    type: Literal["close"]


class McpMessage(_Message):
    type: Literal["mcp"]
    data: dict[str, Any]


MESSAGES: dict[str, type[_Message]] = {
    "reset": ResetMessage, "step": StepMessage, "state": StateMessage, "close": CloseMessage,
    "mcp": McpMessage,
}


def error_frame(message: str, code: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "data": {"message": clip_message(message), "code": code, **extra}}


def service_error_frame(exc: SandboxEnvError) -> dict[str, Any]:
    """A service failure: OpenEnv's code for the client, ours in `error_code` for our client."""
    wire_code = "VALIDATION_ERROR" if exc.http_status == 422 else "EXECUTION_ERROR"
    details = {k: v for k, v in exc.details.items() if k not in ("message", "code")}
    return error_frame(exc.message, wire_code, error_code=exc.code, retryable=exc.retryable,
                       **details)


class WsSession:
    """Protocol state of one connection; `handle` turns one text frame into one reply."""

    def __init__(self, episode: Episode, *, manager: EpisodeManager, metrics: ServerMetrics,
                 max_message_bytes: int, tenant: Tenant) -> None:
        self.episode = episode
        self.tenant = tenant
        self.manager = manager
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.closing = False

    def _too_large(self, text: str) -> bool:
        limit = self.max_message_bytes
        return len(text) > limit or (len(text) * 4 > limit and len(text.encode("utf-8", "replace")) > limit)

    async def handle(self, text: str) -> dict[str, Any] | None:
        """The reply to one frame, or None when the client asked to close."""
        if self._too_large(text):
            return error_frame(
                f"Message too large: {len(text.encode('utf-8', 'replace'))} bytes "
                f"(limit {self.max_message_bytes})", "VALIDATION_ERROR",
                max_message_bytes=self.max_message_bytes)
        try:
            raw = load_bounded(text)
        except NotJson as exc:
            return error_frame(f"Invalid JSON: {exc}", "INVALID_JSON")
        except TooCostly as exc:
            return error_frame(f"Invalid message: {exc}", "VALIDATION_ERROR")
        if not isinstance(raw, dict):
            return error_frame("Invalid message: expected a JSON object with a 'type'",
                               "VALIDATION_ERROR")
        msg_type = raw.get("type", "")
        model = MESSAGES.get(msg_type) if isinstance(msg_type, str) else None
        if model is None:
            return error_frame(f"Unknown message type: {str(msg_type)[:100]}", "UNKNOWN_TYPE")
        try:
            message = model.model_validate(raw)
            return await self._dispatch(message)
        except ValidationError as exc:
            return error_frame("Invalid message", "VALIDATION_ERROR", errors=validation_errors(exc))
        except SandboxEnvError as exc:
            self.metrics.observe_error(exc.code)
            log.info("ws %s failed: %s", msg_type, exc)
            return service_error_frame(exc)
        except Exception as exc:  # the session must survive anything a message triggers
            log.exception("ws %s failed", msg_type)
            return error_frame(f"{type(exc).__name__}: {exc}", "EXECUTION_ERROR")

    async def _dispatch(self, message: _Message) -> dict[str, Any] | None:
        if isinstance(message, StepMessage):
            action = CodeAction.model_validate(message.data)
            observation = await timed_step(self.metrics, self.episode, action,
                                           timeout_s=message.timeout_s)
            return {"type": "observation", "data": observation.to_wire()}
        if isinstance(message, ResetMessage):
            options = ResetRequest.model_validate(message.data).reset_kwargs()
            observation = await self.episode.reset(**options)
            return {"type": "observation", "data": observation.to_wire()}
        if isinstance(message, StateMessage):
            return {"type": "state", "data": self.episode.state.model_dump(mode="json")}
        if isinstance(message, McpMessage):
            reply = await handle_jsonrpc(message.data, manager=self.manager, metrics=self.metrics,
                                         tenant=self.tenant, episode=self.episode)
            # A JSON-RPC notification has no response, but every frame here gets exactly one reply:
            # a client pairing replies by order must not fall out of step.
            return {"type": "mcp", "data": reply}
        self.closing = True
        return None


MAX_QUEUED = 64


class _Inbox:
    """Reads frames ahead in its own task, so a disconnect is seen even while a step runs."""

    def __init__(self, websocket: WebSocket, max_queued_bytes: int, draining: asyncio.Event) -> None:
        self._websocket = websocket
        self.draining = draining  # the server drains: no new request is started
        # Unbounded in the queue's own terms, so the reader never blocks and always sees a
        # disconnect; bounded here: a client that sends more than MAX_QUEUED frames or
        # `max_queued_bytes` ahead of the replies is cut off (1008) instead. Each frame is at most
        # max_message_bytes already: the transport refuses bigger ones from their header (1009).
        self._frames: asyncio.Queue[str] = asyncio.Queue()
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        self.overflow = False
        self.gone = asyncio.Event()
        self._task = asyncio.create_task(self._read(), name="ws-reader")

    async def _read(self) -> None:
        try:
            while True:
                message = await self._websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:  # a binary frame: read it as UTF-8 JSON
                    text = (message.get("bytes") or b"").decode("utf-8", "replace")
                size = len(text)
                if self._frames.qsize() >= MAX_QUEUED or self._queued_bytes + size > self._max_queued_bytes:
                    log.warning("closing /ws session: %d frames (%d bytes) sent ahead of the replies",
                                self._frames.qsize() + 1, self._queued_bytes + size)
                    self.overflow = True
                    return
                self._queued_bytes += size
                self._frames.put_nowait(str(text))
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        finally:
            self.gone.set()

    async def next(self, idle_timeout_s: float | None) -> str | None:
        """The next frame; None once the client is gone (no reply could reach it) or was idle
        for `idle_timeout_s`, or the server drains. Keepalive pings never reach here: they are
        no activity."""
        if self.gone.is_set() or self.draining.is_set():
            return None
        getter = asyncio.ensure_future(self._frames.get())
        gone = asyncio.ensure_future(self.gone.wait())
        draining = asyncio.ensure_future(self.draining.wait())
        try:
            await asyncio.wait({getter, gone, draining}, timeout=idle_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            draining.cancel()
            if not getter.done():
                getter.cancel()
        if self.gone.is_set() or self.draining.is_set():
            return None
        if getter.done() and not getter.cancelled():
            frame = getter.result()
            self._queued_bytes -= len(frame)
            return frame
        log.info("closing /ws session idle for %.0f s", idle_timeout_s)
        return None

    async def run_unless_gone(self, job: Coroutine[Any, Any, _T]) -> tuple[bool, _T | None]:
        """Run `job`; cancel it if the client disconnects first (frees the slot and the kernel)."""
        task = asyncio.ensure_future(job)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return False, None
        return True, task.result()

    def close(self) -> None:
        self._task.cancel()


async def _send(websocket: WebSocket, frame: dict[str, Any]) -> bool:
    """Send a frame; False when the client is gone."""
    try:
        await websocket.send_text(json_dumps(frame))
    except (WebSocketDisconnect, RuntimeError, OSError):
        return False
    return True


router = APIRouter()


@router.websocket("/ws")
async def websocket_session(websocket: WebSocket) -> None:
    """One episode per connection; see the module docstring for the protocol."""
    state = websocket.app.state
    manager: EpisodeManager = state.manager
    metrics: ServerMetrics = state.metrics
    tenant = tenant_of(websocket)
    await websocket.accept()
    try:
        episode = await manager.open_episode(tenant.name)
    except CapacityError as exc:  # full, this tenant's quota, or draining
        metrics.observe_error(exc.code)
        finer = {} if type(exc) is CapacityError else {"error_code": exc.code, "retryable": True}
        await _send(websocket, error_frame(exc.message, "CAPACITY_REACHED", active_sessions=exc.active,
                                           max_sessions=exc.limit, **finer))
        await _close(websocket, CLOSE_TRY_LATER, exc.code)
        return
    except Exception as exc:
        log.exception("cannot open an episode for a /ws session")
        await _send(websocket, error_frame(str(exc), "SESSION_ERROR"))
        await _close(websocket, CLOSE_INTERNAL, "cannot open an episode")
        return

    session = WsSession(episode, manager=manager, metrics=metrics,
                        max_message_bytes=state.settings.max_message_bytes, tenant=tenant)
    inbox = _Inbox(websocket, state.settings.max_message_bytes, state.draining)
    close_code, reason = CLOSE_GOING_AWAY, ""
    state.ws_sessions += 1
    try:
        while (text := await inbox.next(state.settings.session_timeout_s)) is not None:
            finished, reply = await inbox.run_unless_gone(session.handle(text))
            if not finished:
                log.info("/ws client left during a request; the request was cancelled")
                break
            if session.closing:
                close_code = CLOSE_NORMAL
                break
            if reply is not None and not await _send(websocket, reply):
                break
            if episode.closed:  # reaped by the manager's idle timeout: nothing left to serve
                break
    finally:
        inbox.close()
        if inbox.overflow:
            close_code, reason = CLOSE_POLICY_VIOLATION, "too much sent ahead of the replies"
        elif state.draining.is_set() and close_code == CLOSE_GOING_AWAY:
            reason = "server shutting down"
        try:
            await manager.close_episode(episode)
        except Exception:
            log.exception("closing the episode of a /ws session failed")
        await _close(websocket, close_code, reason)
        state.ws_sessions -= 1


async def _close(websocket: WebSocket, code: int, reason: str = "") -> None:
    try:
        await websocket.close(code=code, reason=reason)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # already closed by the client
