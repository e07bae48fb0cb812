"""The bad-input table (issue #9, item 6): every malformed frame, body and header, and every
oversized input, gets a clear 4xx or error frame, never a 500, a hang or an echo of the input;
the session (or the connection's next request) goes on."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
from websockets.asyncio.client import connect

MARK = "echo-me-" + "4" * 16  # in bad inputs: must never come back (only short names of what
# was not found, a policy or a task id, are quoted back)
DEEP = "[" * 200000  # past the JSON decoder's recursion limit
NESTED = json.loads("[" * 100 + "]" * 100)  # decodes, but deeper than the server takes


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws"


JSON = {"content-type": "application/json"}
HTTP_TABLE = [
    # (method, path, body bytes, headers, expected status)
    ("POST", "/step", b"not json " + MARK.encode(), JSON, 422),
    ("POST", "/step", b'{"action": {"code": "' + MARK.encode() + b'"', JSON, 422),
    ("POST", "/step", DEEP.encode(), JSON, 422),  # refused by its count of values, before parsing
    ("POST", "/step", b'{"action": {"code": "\xff\xfe' + MARK.encode() + b'"}}', JSON, 400),
    ("POST", "/step", json.dumps([MARK]).encode(), JSON, 422),
    ("POST", "/step", json.dumps({"action": MARK}).encode(), JSON, 422),
    ("POST", "/step", json.dumps({"action": {"code": 5, "x": MARK}}).encode(), JSON, 422),
    ("POST", "/step", json.dumps({"action": {"code": "1"}, "timeout_s": MARK}).encode(), JSON, 422),
    ("POST", "/step", json.dumps({"action": {"code": MARK}}).encode(), {"content-type": "text/plain"}, 415),
    ("POST", "/step", json.dumps({"action": {"code": MARK}}).encode(),
     {"content-type": "application/x-www-form-urlencoded"}, 415),
    ("POST", "/step", json.dumps({"action": {"code": MARK}}).encode(), {"content-type": "multipart/form-data"}, 415),
    ("POST", "/reset", json.dumps({"seed": MARK}).encode(), JSON, 422),
    ("POST", "/reset", json.dumps({"policy": "../../etc/passwd"}).encode(), JSON, 422),
    ("POST", "/reset", json.dumps({"policy": "trusted-eval"}).encode(), JSON, 422),
    ("POST", "/grade", json.dumps({"submission": MARK}).encode(), JSON, 422),
    ("POST", "/grade", json.dumps({"submission": MARK, "task_id": "no-such-task"}).encode(), JSON, 404),
    ("POST", "/grade", json.dumps({"submission": "x", "task": {"id": MARK}}).encode(), JSON, 422),
    ("POST", "/grade", DEEP.encode(), JSON, 422),
    ("GET", "/episodes/no-such-" + "e" * 4000, b"", {}, 404),  # quoted back cut to 100 characters
    ("DELETE", "/episodes/no-such-episode", b"", {}, 404),
    ("PUT", "/step", b"{}", JSON, 405),
]


async def test_bad_http_bodies_get_a_clear_4xx_without_echo(live_server) -> None:
    limit = live_server.settings.max_message_bytes
    table = [*HTTP_TABLE, ("POST", "/step", b'{"action": {"code": "' + b"x" * limit + b'"}}', JSON, 413)]
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=60) as http:
        for method, path, body, headers, status in table:
            reply = await http.request(method, path, content=body, headers=headers)
            assert reply.status_code == status, (method, path, body[:80], reply.status_code, reply.text[:300])
            assert MARK not in reply.text[:100000], (path, body[:80], reply.text[:300])
            if status != 413:  # FastAPI's own body limit answers first, in plain text
                assert reply.headers["content-type"].startswith("application/json"), reply.headers
            assert len(reply.content) < 4096, (path, reply.text[:300])  # never the input back
            # the connection and the server go on
            ok = await http.post("/step", json={"action": {"code": "print(6 * 7)"}})
            assert ok.status_code == 200 and ok.json()["observation"]["stdout"] == "42\n"


MCP_TABLE = [
    (b"not json", -32700), (DEEP.encode(), -32600), (b"[]", -32600), (b"7", -32600),
    (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"n": NESTED}}).encode(), -32600),
    (json.dumps({"jsonrpc": "2.0", "id": [1], "method": "tools/list"}).encode(), -32600),
    (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                 "params": {"name": "run_python", "arguments": {"code": 1}}}).encode(), -32602),
    (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "run_python", "arguments": {"code": "1"}, "session_id": MARK}}).encode(), -32602),
]


async def test_bad_mcp_requests_get_a_json_rpc_error(live_server) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=60) as http:
        for body, code in MCP_TABLE:
            reply = await http.post("/mcp", content=body, headers=JSON)
            assert reply.status_code == 200 and reply.json()["error"]["code"] == code, (body[:80], reply.text[:300])
        listed = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert listed.json()["result"]["tools"][0]["name"] == "run_python"


WS_TABLE = [
    # (frame, error code, error_code)
    ("not json", "INVALID_JSON", None),
    (DEEP, "VALIDATION_ERROR", None),  # more values than the server parses
    (b"\xff\xfe binary, not UTF-8", "INVALID_JSON", None),
    ("[]", "VALIDATION_ERROR", None),
    ('"step"', "VALIDATION_ERROR", None),
    ("{}", "UNKNOWN_TYPE", None),
    (json.dumps({"type": 5}), "UNKNOWN_TYPE", None),
    (json.dumps({"type": MARK}), "UNKNOWN_TYPE", None),
    (json.dumps({"type": "step"}), "VALIDATION_ERROR", None),
    (json.dumps({"type": "step", "data": MARK}), "VALIDATION_ERROR", None),
    (json.dumps({"type": "step", "data": {"code": 1}}), "VALIDATION_ERROR", None),
    (json.dumps({"type": "step", "data": {"code": MARK, "cmd": MARK}}), "VALIDATION_ERROR", None),
    (json.dumps({"type": "step", "data": {"code": "1"}, "timeout_s": -1}), "VALIDATION_ERROR", None),
    (json.dumps({"type": "state", "extra": MARK}), "VALIDATION_ERROR", None),
    (json.dumps({"type": "reset", "data": {"seed": -1}}), "VALIDATION_ERROR", None),
    (json.dumps({"type": "reset", "data": {"step_count": 9}}), "VALIDATION_ERROR", "invalid_request"),
    (json.dumps({"type": "reset", "data": {"policy": "trusted-eval"}}), "VALIDATION_ERROR", "policy_not_found"),
    (json.dumps({"type": "reset", "data": {"policy": "/etc/passwd"}}), "VALIDATION_ERROR", "policy_not_found"),
    (json.dumps({"type": "reset", "data": {"task_id": "no-such-task"}}), "EXECUTION_ERROR", "task_not_found"),
    (json.dumps({"type": "reset", "data": {"options": NESTED}}), "VALIDATION_ERROR", None),
    (json.dumps({"type": "step", "data": {"code": "1", "metadata": {"n": NESTED}}}), "VALIDATION_ERROR", None),
]


async def test_bad_frames_get_an_error_frame_and_the_session_goes_on(live_server) -> None:
    async with connect(ws_url(live_server), additional_headers=live_server.headers, max_size=None) as ws:
        async def ask(frame: str | bytes | dict) -> dict:
            await ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))
            return json.loads(await asyncio.wait_for(ws.recv(), 60))

        await ask({"type": "reset", "data": {"episode_id": "keeps"}})
        await ask({"type": "step", "data": {"code": "kept = 41"}})
        for frame, code, error_code in WS_TABLE:
            reply = await ask(frame)
            assert reply["type"] == "error" and reply["data"]["code"] == code, (frame[:80], reply)
            if error_code is not None:
                assert reply["data"]["error_code"] == error_code, (frame[:80], reply)
            assert MARK not in json.dumps(reply)[:100000] or code == "UNKNOWN_TYPE", reply
            state = await ask({"type": "state"})
            assert state["type"] == "state" and state["data"]["episode_id"] == "keeps", (frame[:80], state)
        assert (await ask({"type": "step", "data": {"code": "print(kept + 1)"}}))["data"]["observation"]["stdout"] == "42\n"


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received:
                break
        return received


HEADS = [
    ("garbage request line", b"\x16\x03\x01 not http\r\n\r\n", b"400"),
    ("bad header syntax", b"GET /health HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n", b"400"),
    ("foreign Host", b"GET /episodes HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {t}\r\n\r\n", b"403"),
    ("rebinding Host with our port", b"GET /episodes HTTP/1.1\r\nHost: evil.example:{p}\r\nAuthorization: Bearer {t}\r\n\r\n",
     b"403"),
    ("foreign Origin on a POST", b"POST /reset HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nOrigin: http://evil.example\r\n"
     b"Authorization: Bearer {t}\r\nContent-Length: 0\r\n\r\n", b"403"),
    ("unknown auth scheme", b"GET /episodes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Digest x\r\n\r\n", b"401"),
    ("empty bearer", b"GET /episodes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \r\n\r\n", b"401"),
    ("bad Basic", b"GET /episodes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic ???\r\n\r\n", b"401"),
    ("header too large", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * (100 << 10) + b"\r\n\r\n", b"431"),
    ("websocket upgrade without token", b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", b"401"),
]


async def test_bad_heads_get_a_clear_4xx_and_the_server_goes_on(live_server) -> None:
    port = int(live_server.url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=30) as http:
        for name, head, status in HEADS:
            head = head.replace(b"{t}", str(live_server.token).encode()).replace(b"{p}", str(port).encode())
            reply = await asyncio.to_thread(_raw, port, head)
            assert reply.split(b" ", 2)[1] == status, (name, reply[:300])
            assert (await http.get("/episodes")).status_code == 200
