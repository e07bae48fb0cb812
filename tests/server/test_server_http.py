"""HTTP endpoints against a real server: OpenEnv's stateless API, probes, schema, MCP, validate."""

from __future__ import annotations

import httpx
import pytest
from openenv.cli._validation import validate_running_environment

from sandbox_env.models import CodeAction


@pytest.fixture
async def http(live_server):
    async with httpx.AsyncClient(base_url=live_server.url, timeout=60, headers=live_server.headers) as client:
        yield client


async def test_probes(http) -> None:
    assert (await http.get("/health")).json() == {"status": "healthy"}
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["max_sessions"] == 8


async def test_reset_and_step_are_stateless(http) -> None:
    reply = await http.post("/reset")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) >= {"observation", "reward", "done"}
    assert set(body["observation"]) == {"stdout", "stderr", "exit_code", "metadata"}

    reply = await http.post("/reset", json={"seed": 3, "episode_id": "http-ep"})
    assert reply.status_code == 200

    reply = await http.post("/step", json={"action": {"code": "x = 1; print(x)"}})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["observation"]["stdout"] == "1\n"
    assert body["metadata"]["execution"]["status"] == "ok"
    assert body["done"] is False
    # every request gets a new episode: x is gone
    body = (await http.post("/step", json={"action": {"code": "print(x)"}})).json()
    assert body["observation"]["exit_code"] != 0 and "NameError" in body["observation"]["stderr"]

    state = (await http.get("/state")).json()
    assert state["episode_id"] is None and state["step_count"] == 0


async def test_step_timeout_over_http(http) -> None:
    reply = await http.post("/step", json={"action": {"code": "import time; time.sleep(30)"},
                                           "timeout_s": 1})
    assert reply.status_code == 200
    assert reply.json()["metadata"]["execution"]["status"] == "timeout"


async def test_http_422s(http) -> None:
    for body in ({}, {"action": "print(1)"}, {"action": {"code": "1"}, "timeout_s": 0}):
        assert (await http.post("/step", json=body)).status_code == 422, body
    reply = await http.post("/step", json={"action": {"code": "1", "cmd": "x"}})
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["type"] == "extra_forbidden"
    assert reply.json()["detail"][0]["loc"] == ["cmd"]
    reply = await http.post("/step", json={"action": {}})
    assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["code"]
    assert (await http.post("/step", content=b"{not json",
                            headers={"content-type": "application/json"})).status_code == 422
    assert (await http.post("/reset", json={"seed": -1})).status_code == 422
    reply = await http.post("/reset", json={"policy": "no-such-policy"})
    assert reply.status_code == 422
    assert reply.json()["detail"]["code"] == "policy_not_found"


async def test_schema_metadata_docs(http) -> None:
    schema = (await http.get("/schema")).json()
    assert set(schema) == {"action", "observation", "state"}
    assert schema["action"]["required"] == ["code"]
    assert schema["action"]["additionalProperties"] is False
    assert set(schema["action"]["properties"]) == {"code", "metadata", "submit"}  # submit: issue 4
    assert {"stdout", "stderr", "exit_code"} <= set(schema["observation"]["properties"])
    assert {"episode_id", "step_count", "last_exit_code"} <= set(schema["state"]["properties"])
    assert schema["action"] == CodeAction.model_json_schema()

    meta = (await http.get("/metadata")).json()
    assert set(meta) == {"name", "description", "version", "readme_content", "author",
                         "documentation_url"}
    assert meta["name"] == "sandbox_env" and meta["description"]

    assert (await http.get("/docs")).status_code == 200
    openapi = (await http.get("/openapi.json")).json()
    assert openapi["info"]["version"].startswith("1.")
    assert {"/reset", "/step", "/state", "/health", "/schema", "/metadata", "/mcp"} <= set(openapi["paths"])


async def test_metrics(http) -> None:
    await http.post("/step", json={"action": {"code": "print(1)"}})
    reply = await http.get("/metrics")
    assert reply.status_code == 200
    text = reply.text
    for name in ("sandbox_env_episodes_active", "sandbox_env_capacity 8.0",
                 "sandbox_env_step_seconds_bucket", 'sandbox_env_executions_total{status="ok"}'):
        assert name in text, name


async def test_mcp_http(http) -> None:
    reply = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert reply.status_code == 200
    tools = {t["name"]: t for t in reply.json()["result"]["tools"]}
    assert tools["run_python"]["inputSchema"]["properties"]["code"] == {
        "type": "string", "description": "Python source to execute"}
    assert tools["run_python"]["inputSchema"]["required"] == ["code"]

    reply = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                          "params": {"name": "run_python",
                                                     "arguments": {"code": "print(6 * 7)"}}})
    result = reply.json()["result"]
    assert result["content"] == [{"type": "text", "text": "42\n"}]
    assert result["isError"] is False
    assert result["structuredContent"]["exit_code"] == 0

    reply = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                          "params": {"name": "run_python",
                                                     "arguments": {"code": "raise ValueError('no')"}}})
    result = reply.json()["result"]
    assert result["isError"] is True and "ValueError: no" in result["content"][0]["text"]

    init = (await http.post("/mcp", json={"jsonrpc": "2.0", "id": 4, "method": "initialize",
                                          "params": {}})).json()
    assert init["result"]["capabilities"] == {"tools": {"listChanged": False}}


@pytest.mark.parametrize(("body", "code"), [
    (b"{}", -32600),
    (b"not json", -32700),
    (b"[]", -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "no/such"}', -32601),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "tools/list"}', -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": [1]}', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "rm"}}', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "run_python"}}', -32602),
])
async def test_mcp_bad_requests(http, body: bytes, code: int) -> None:
    reply = await http.post("/mcp", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 200
    payload = reply.json()
    assert payload["jsonrpc"] == "2.0"
    assert payload["error"]["code"] == code


async def test_mcp_sessions(http) -> None:
    created = (await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1,
                                             "method": "openenv/session/create"})).json()
    session_id = created["result"]["session_id"]

    async def call(code: str) -> dict:
        reply = await http.post("/mcp", json={
            "jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "run_python", "arguments": {"code": code}, "session_id": session_id}})
        return reply.json()

    await call("kept = 'yes'")
    assert (await call("print(kept)"))["result"]["content"][0]["text"] == "yes\n"
    closed = (await http.post("/mcp", json={"jsonrpc": "2.0", "id": 3, "method": "openenv/session/close",
                                            "params": {"session_id": session_id}})).json()
    assert closed["result"]["closed"] is True
    assert (await call("print(kept)"))["error"]["code"] == -32602


def test_openenv_validate_passes(live_server) -> None:
    # OpenEnv's validator sends no headers; a URL with userinfo makes it send HTTP Basic, which
    # the server accepts with the token as password.
    url = live_server.url.replace("http://", f"http://token:{live_server.token}@", 1)
    report = validate_running_environment(url, timeout_s=30)
    failed = [c for c in report["criteria"] if not c["passed"]]
    assert report["passed"], failed
    assert report["summary"]["passed_count"] == report["summary"]["total_count"] == 6
    assert report["standard_profile"] == "openenv-http/1.x" and report["mode"] == "simulation"


async def test_oversized_body_is_413(http, live_server) -> None:
    """The 413 reaches the client every time, announced or chunked, on a kept-alive connection."""
    body = b'{"action": {"code": "' + b"x" * live_server.settings.max_message_bytes + b'"}}'

    async def chunks():
        for start in range(0, len(body), 2**20):
            yield body[start:start + 2**20]

    for _ in range(5):
        reply = await http.post("/step", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 413, reply.text[:200]
        reply = await http.post("/step", content=chunks(), headers={"content-type": "application/json"})
        assert reply.status_code == 413, reply.text[:200]
    assert (await http.get("/health")).status_code == 200


def test_413_when_head_and_body_share_a_segment(live_server) -> None:
    """Body bytes that arrive with the head are not counted as head (that was a 431 and a reset
    connection whenever the two were coalesced); the client, still sending, reads the 413."""
    import socket
    import time
    from urllib.parse import urlsplit

    url = urlsplit(live_server.url)
    size = live_server.settings.max_message_bytes + 1
    head = (f"POST /step HTTP/1.1\r\nhost: {url.netloc}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {live_server.token}\r\ncontent-length: {size}\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head + b"x" * 65536)
        time.sleep(0.5)  # the server has decided by now; the rest of the body is still unsent
        sent = 65536
        while sent < size:
            chunk = min(2**20, size - sent)
            sock.sendall(b"x" * chunk)
            sent += chunk
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            assert data, reply
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
