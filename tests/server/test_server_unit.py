"""Server pieces that need no running server."""

from __future__ import annotations

import json

import sandbox_env.server.app as app_module
from sandbox_env.models import CodeObservation, ExecStatus, ExecutionResult
from sandbox_env.server.mcp import tool_result
from sandbox_env.server.routes import JSONResponse, json_dumps
from sandbox_env.settings import Settings


def test_json_never_emits_invalid_utf8() -> None:
    text = json_dumps({"stdout": "ok \udcff é"})
    text.encode("utf-8")  # would raise on a lone surrogate
    assert json.loads(text)["stdout"] == "ok ? é"
    body = JSONResponse({"stdout": "\ud800"}).body
    assert json.loads(body.decode("utf-8")) == {"stdout": "?"}


def test_uvicorn_kwargs_bound_frames_at_the_message_limit() -> None:
    settings = Settings(_env_file=None, max_message_bytes=32 << 20, port=9999)  # type: ignore[call-arg]
    kwargs = app_module.uvicorn_kwargs(settings)
    assert kwargs["ws_max_size"] == settings.max_message_bytes
    assert kwargs["limit_concurrency"] == settings.max_connections
    assert kwargs["port"] == 9999 and kwargs["host"] == settings.host


def test_module_level_app_is_built_lazily() -> None:
    assert "_app" in vars(app_module)
    app = app_module.app
    assert app is app_module.app
    assert {"/reset", "/step", "/state", "/mcp"} <= set(app.openapi()["paths"])


def test_tool_result_shapes() -> None:
    result = ExecutionResult(stdout="out\n", stderr="", exit_code=1, status=ExecStatus.TIMEOUT)
    mcp = tool_result(CodeObservation.from_result(result))
    assert mcp["isError"] is True
    assert mcp["content"][0] == {"type": "text", "text": "out\n[timeout]"}
    png = ExecutionResult(displays=[{"data": {"image/png": "iVBO", "text/plain": "<Figure>"}}])
    mcp = tool_result(CodeObservation.from_result(png))
    assert mcp["content"][1] == {"type": "image", "data": "iVBO", "mimeType": "image/png"}
