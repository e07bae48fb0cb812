"""MCP over JSON-RPC 2.0: `POST /mcp` and the `{"type": "mcp"}` message on `/ws`.

One handler serves both transports. Over HTTP a call runs in a throwaway episode unless it names
a session opened with `openenv/session/create`; over `/ws` it runs in the connection's episode,
as OpenEnv's session-scoped MCP does. Errors are JSON-RPC error objects, never HTTP errors, so
`openenv validate` and MCP clients always get a JSON-RPC body.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from sandbox_env._version import __version__
from sandbox_env.errors import DrainingError, SandboxEnvError
from sandbox_env.models import CodeAction, CodeObservation, ExecStatus
from sandbox_env.server.auth import ANONYMOUS, Tenant
from sandbox_env.server.farm import farm_of
from sandbox_env.server.guard import tenant_of
from sandbox_env.server.json_limits import NotJson, TooCostly, load_bounded
from sandbox_env.server.metrics import ServerMetrics, timed_step
from sandbox_env.server.routes import JSONResponse

if TYPE_CHECKING:
    from sandbox_env.episode import Episode
    from sandbox_env.manager import EpisodeManager

log = logging.getLogger(__name__)

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = (
    -32700, -32600, -32601, -32602, -32603)
SERVER_ERROR = -32000
PROTOCOL_VERSION = "2025-06-18"

RUN_PYTHON_TOOL: dict[str, Any] = {
    "name": "run_python",
    "title": "Run Python",
    "description": (
        "Execute Python code in a sandboxed interpreter and return its stdout and stderr. "
        "Over HTTP each call gets a fresh interpreter unless `session_id` names an open session; "
        "over the /ws session the namespace persists between calls."
    ),
    "inputSchema": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "description": "Python source to execute"},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0,
                          "description": "wall-time limit of this call (seconds)"},
        },
        "required": ["code"],
        "additionalProperties": False,
    },
}


class McpSessions:
    """Episodes opened over HTTP with `openenv/session/create`: episodes like any other. They
    count toward capacity and their tenant's quota, `/episodes` lists them under their session id
    (which is the MCP session id) from the start, `DELETE /episodes/{id}` closes them, and the
    manager's idle reaper closes forgotten ones. Only their tenant (or the admin) can use them."""

    def __init__(self) -> None:
        self._episodes: dict[str, Episode] = {}

    def __len__(self) -> int:
        return len(self._episodes)

    async def create(self, manager: EpisodeManager, tenant: Tenant) -> str:
        self._episodes = {k: ep for k, ep in self._episodes.items() if not ep.closed}
        episode = await manager.open_episode(tenant.name)
        self._episodes[episode.session_id] = episode
        return episode.session_id

    def get(self, session_id: str, tenant: Tenant) -> Episode | None:
        episode = self._episodes.get(session_id)
        if episode is not None and episode.closed:  # reaped while idle, or closed by DELETE
            del self._episodes[session_id]
            return None
        return episode if episode is not None and tenant.may_touch(episode.owner) else None

    async def close(self, manager: EpisodeManager, session_id: str, tenant: Tenant) -> bool:
        if self.get(session_id, tenant) is None:
            return False
        episode = self._episodes.pop(session_id)
        await manager.close_episode(episode)
        return True

    async def close_all(self, manager: EpisodeManager) -> None:
        for session_id in list(self._episodes):
            try:
                await self.close(manager, session_id, ANONYMOUS)
            except Exception:
                log.exception("closing MCP session %s failed", session_id)


def _error(code: int, message: str, request_id: Any = None, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _result(result: Any, request_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def tool_result(observation: CodeObservation) -> dict[str, Any]:
    """MCP `CallToolResult`: the printed text, images as image content, details structured."""
    text = observation.stdout
    if observation.stderr:
        text += ("\n" if text and not text.endswith("\n") else "") + observation.stderr
    execution = observation.execution
    content: list[dict[str, Any]] = []
    if execution is not None and execution.status not in (ExecStatus.OK, ExecStatus.ERROR):
        text += ("\n" if text and not text.endswith("\n") else "") + f"[{execution.status.value}]"
    content.append({"type": "text", "text": text})
    for display in execution.displays if execution is not None else []:
        for mime, value in display.data.items():
            if mime.startswith("image/") and isinstance(value, str) and mime != "image/svg+xml":
                content.append({"type": "image", "data": value, "mimeType": mime})
    return {"content": content, "isError": observation.exit_code != 0,
            "structuredContent": observation.to_wire()["observation"]}


class _Request(BaseModel):
    """A JSON-RPC 2.0 request (a notification has no `id`); other members are ignored."""

    jsonrpc: Literal["2.0"]
    method: Annotated[StrictStr, Field(min_length=1)]
    id: StrictStr | StrictInt | None = None
    params: dict[str, Any] | None = None


class _RunPythonArguments(BaseModel):
    """`run_python`'s arguments: its inputSchema above, as a model."""

    model_config = ConfigDict(extra="forbid")
    code: StrictStr
    timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)] | None = None


class _ToolCall(BaseModel):
    name: Annotated[StrictStr, Field(min_length=1)]
    arguments: dict[str, Any] | None = None
    session_id: Any = None  # looked up as a string; anything else is an unknown session


def _first_problem(exc: ValidationError) -> str:
    """Where and what, never the input (it may be large, or echo a caller's secret)."""
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def _parse_request(payload: Any) -> _Request | dict[str, Any]:
    """The request, or the JSON-RPC error to answer (with the request's id when that is valid)."""
    if isinstance(payload, list):
        return _error(INVALID_REQUEST, "Invalid Request: batch requests are not supported")
    if not isinstance(payload, dict):
        return _error(INVALID_REQUEST, "Invalid Request: expected a JSON object")
    try:
        return _Request.model_validate(payload)
    except ValidationError as exc:
        bad = {error["loc"][0] for error in exc.errors() if error["loc"]}
        if "id" in bad:
            return _error(INVALID_REQUEST, "Invalid Request: 'id' must be a string, a number or null")
        request_id = payload.get("id")
        if bad == {"params"}:
            return _error(INVALID_PARAMS, "Params must be an object", request_id)
        return _error(INVALID_REQUEST, "Invalid Request: need jsonrpc '2.0' and a method", request_id)


def _parse_call(params: dict[str, Any]) -> tuple[_ToolCall, CodeAction, float | None] | str:
    """The call, its action and timeout, or the reason it is invalid."""
    try:
        call = _ToolCall.model_validate(params)
    except ValidationError as exc:
        return f"Invalid params - {_first_problem(exc)}"
    if call.name != RUN_PYTHON_TOOL["name"]:
        return f"Tool not found: {call.name[:100]}"
    try:
        arguments = _RunPythonArguments.model_validate(call.arguments or {})
    except ValidationError as exc:
        return f"Invalid arguments - {_first_problem(exc)}"
    return call, CodeAction(code=arguments.code), arguments.timeout_s


async def handle_jsonrpc(payload: Any, *, manager: EpisodeManager, metrics: ServerMetrics,
                         tenant: Tenant, sessions: McpSessions | None = None,
                         episode: Episode | None = None) -> dict[str, Any] | None:
    """Answer one JSON-RPC request; None for a notification (which gets no response)."""
    request = _parse_request(payload)
    if isinstance(request, dict):
        return request
    if "id" not in payload and request.method.startswith("notifications/"):
        return None
    try:
        return await _dispatch(request.method, request.params or {}, request.id, manager=manager,
                               metrics=metrics, tenant=tenant, sessions=sessions, episode=episode)
    except SandboxEnvError as exc:
        metrics.observe_error(exc.code)
        return _error(SERVER_ERROR, exc.message, request.id,
                      data={**exc.to_dict(), "error_code": exc.code, "retryable": exc.retryable})
    except Exception as exc:
        log.exception("MCP %s failed", request.method)
        return _error(INTERNAL_ERROR, f"Internal error: {exc}", request.id)


async def _dispatch(method: str, params: dict[str, Any], request_id: Any, *,
                    manager: EpisodeManager, metrics: ServerMetrics, tenant: Tenant,
                    sessions: McpSessions | None, episode: Episode | None) -> dict[str, Any]:
    if method == "initialize":
        return _result({
            "protocolVersion": str(params.get("protocolVersion") or PROTOCOL_VERSION),
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "sandbox-env", "version": __version__},
        }, request_id)
    if method == "ping":
        return _result({}, request_id)
    if method == "tools/list":
        return _result({"tools": [RUN_PYTHON_TOOL]}, request_id)
    if method == "openenv/session/create":
        if episode is not None:  # on /ws the connection already is the session
            return _result({"session_id": episode.id or episode.session_id}, request_id)
        if sessions is None:
            return _error(METHOD_NOT_FOUND, f"Method not found: {method}", request_id)
        return _result({"session_id": await sessions.create(manager, tenant)}, request_id)
    if method == "openenv/session/close":
        session_id = params.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            return _error(INVALID_PARAMS, "Invalid params - 'session_id' is required", request_id)
        if episode is not None or sessions is None:
            return _error(INVALID_REQUEST, "Cannot close a WebSocket-managed session via MCP", request_id)
        if not await sessions.close(manager, session_id, tenant):
            return _error(INVALID_PARAMS, "Unknown session_id", request_id)
        return _result({"session_id": session_id, "closed": True}, request_id)
    if method != "tools/call":
        return _error(METHOD_NOT_FOUND, f"Method not found: {method}", request_id)

    parsed = _parse_call(params)
    if isinstance(parsed, str):
        return _error(INVALID_PARAMS, parsed, request_id)
    call, action, timeout_s = parsed
    target = episode
    if target is None and call.session_id is not None:
        target = sessions.get(str(call.session_id), tenant) if sessions is not None else None
        if target is None:
            return _error(INVALID_PARAMS, "Unknown session_id", request_id)
    if target is not None:
        if manager.draining:  # as on /ws: an open session starts no new request while the server drains
            raise DrainingError(manager.active, manager.capacity)
        observation = await timed_step(metrics, target, action, timeout_s=timeout_s)
    else:
        async with manager.stateless(tenant.name) as throwaway:
            observation = await timed_step(metrics, throwaway, action, timeout_s=timeout_s)
    return _result(tool_result(observation), request_id)


router = APIRouter(tags=["MCP"])


@router.post("/mcp", summary="MCP JSON-RPC 2.0 endpoint (tools/list, tools/call run_python)",
             response_model=None)
async def mcp_http(request: Request) -> Response:
    """Always HTTP 200 with a JSON-RPC body (202 without body for MCP notifications)."""
    state = request.app.state
    body = await request.body()
    if not body.strip():
        return JSONResponse(_error(INVALID_REQUEST, "Invalid Request: empty body"))
    try:
        payload = load_bounded(body)
    except NotJson as exc:
        return JSONResponse(_error(PARSE_ERROR, f"Parse error: {exc}"))
    except TooCostly as exc:
        return JSONResponse(_error(INVALID_REQUEST, f"Invalid Request: {exc}"))
    sessions: McpSessions = state.mcp_sessions
    farm = farm_of(request)
    params = payload.get("params") if isinstance(payload, dict) else None
    session_id = params.get("session_id") if isinstance(params, dict) else None
    if farm is not None and isinstance(session_id, str) and sessions.get(session_id, tenant_of(request)) is None:
        owned = await farm.to_owner(request, session_id, body)  # another replica's session: its answer
        if owned is not None:
            return owned
    reply = await handle_jsonrpc(payload, manager=state.manager, metrics=state.metrics,
                                 tenant=tenant_of(request), sessions=sessions)
    if reply is None:
        return Response(status_code=202)
    return JSONResponse(reply)
