"""Bounded memory and connections (issue #9, item 4), each finding tried on a real socket.

The findings: 64 queued WebSocket frames of up to 64 MiB each were accepted before the 16 MiB
check; history kept 100 entries per episode with no byte cap; a connection sending half a header
line every 15 s was still open after 76 s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

KIB = 1024


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws"


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def request(ws, frame: dict) -> dict:
    await ws.send(json.dumps(frame))
    return json.loads(await asyncio.wait_for(ws.recv(), 60))


async def test_a_frame_above_the_limit_is_refused_from_its_header(live_server_factory) -> None:
    server = live_server_factory(max_message_bytes=64 * KIB, pool_size=1)
    async with connect(ws_url(server), additional_headers=server.headers, max_size=None) as ws:
        assert (await request(ws, {"type": "step", "data": {"code": "x = 1"}}))["type"] == "observation"
        await ws.send(json.dumps({"type": "step", "data": {"code": "#" * (1 << 20)}}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_frames_sent_ahead_are_bounded_in_bytes(live_server_factory) -> None:
    """Each frame is under the limit; together, sent while a step runs, they are not."""
    server = live_server_factory(max_message_bytes=64 * KIB, pool_size=1)
    async with connect(ws_url(server), additional_headers=server.headers, max_size=None) as ws:
        await request(ws, {"type": "step", "data": {"code": "x = 1"}})
        await ws.send(json.dumps({"type": "step", "data": {"code": "import time; time.sleep(3)"}}))
        for _ in range(4):
            await ws.send(json.dumps({"type": "step", "data": {"code": "#" * (40 * KIB)}}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    # a client that waits for each reply may send as much, one frame at a time
    async with connect(ws_url(server), additional_headers=server.headers, max_size=None) as ws:
        for _ in range(4):
            reply = await request(ws, {"type": "step", "data": {"code": "#" * (40 * KIB)}})
            assert reply["type"] == "observation"


async def test_step_history_is_capped_per_episode_and_per_server(live_server_factory) -> None:
    server = live_server_factory(history_bytes=48 * KIB, history_total_bytes=128 * KIB, max_sessions=4,
                                 pool_size=1)  # 128 KiB / 4 sessions: 32 KiB per episode
    async with connect(ws_url(server), additional_headers=server.headers, max_size=None) as ws, \
            httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
        await request(ws, {"type": "reset", "data": {"episode_id": "chatty", "task": {
            "id": "t", "prompt": "", "tests": {"kind": "asserts", "asserts": ["assert True"]}}}})
        for i in range(10):
            reply = await request(ws, {"type": "step", "data": {"code": f"print({i}, 'y' * 10000)"}})
            assert reply["type"] == "observation"
        big = await request(ws, {"type": "step", "data": {"code": "print('z' * 200000)"}})
        assert len(big["data"]["observation"]["stdout"]) == 200001  # the reply itself is whole
        detail = (await http.get("/episodes/chatty")).json()
        history = detail["history"]
        assert len(json.dumps(history)) <= 32 * KIB + 4 * KIB, len(json.dumps(history))
        assert history[-1]["code"] == "print('z' * 200000)" and history[-1].get("trimmed") is True
        assert len(history) < 11
        # "submit everything run so far" would now miss steps: the server says so
        refused = await request(ws, {"type": "step", "data": {"code": "", "submit": True}})
        assert refused["type"] == "error" and "capped" in refused["data"]["message"]


def _slow_header(port: int, interval_s: float, bound_s: float) -> tuple[bytes, float]:
    """Send half a header line, then one more byte every `interval_s`; what the server answers
    before it closes, and how long the connection lived (bounded by `bound_s`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=bound_s) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        received = b""
        sock.settimeout(interval_s)
        while time.monotonic() - started < bound_s:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                try:
                    sock.sendall(b"a")
                except OSError:
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        return received, time.monotonic() - started


async def test_slowloris_half_a_header_line_is_cut_off(live_server_factory) -> None:
    server = live_server_factory(header_timeout_s=2.0, pool_size=0)
    received, lived = await asyncio.to_thread(_slow_header, port_of(server), 0.5, 60.0)
    assert lived < 60.0, "the server kept a slowloris connection open"
    assert received.startswith(b"HTTP/1.1 408"), received
    # a connection that never sends anything is closed as well
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=60) as idle:
        answer = await asyncio.to_thread(idle.recv, 4096)  # raises TimeoutError if never closed
        assert answer in (b"", received[:len(answer)]) or answer.startswith(b"HTTP/1.1 408")
    # and the server still answers a normal client
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.get("/health")).status_code == 200


async def test_oversized_request_heads_are_refused(live_server_factory) -> None:
    server = live_server_factory(max_header_bytes=8 * KIB, pool_size=0)

    def send_big_head() -> bytes:
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) as sock:
            head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"p" * (64 * KIB)
            try:
                sock.sendall(head)
            except OSError:
                pass
            return sock.recv(4096)

    assert (await asyncio.to_thread(send_big_head)).startswith(b"HTTP/1.1 431")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.get("/health", headers={"x-pad": "p" * (4 * KIB)})).status_code == 200


async def test_connections_are_bounded(live_server_factory) -> None:
    server = live_server_factory(max_connections=6, header_timeout_s=60.0, pool_size=0)
    held = [socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) for _ in range(6)]
    try:
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            assert (await http.get("/health")).status_code == 503
    finally:
        for sock in held:
            sock.close()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        deadline = time.monotonic() + 30
        while (await http.get("/health")).status_code != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_frames_are_never_compressed(live_server) -> None:
    """permessage-deflate is not negotiated: a frame costs the server what the client sent."""
    async with connect(ws_url(live_server), additional_headers=live_server.headers, compression="deflate") as ws:
        assert "sec-websocket-extensions" not in {k.lower() for k in ws.response.headers.keys()}
        assert (await request(ws, {"type": "state"}))["type"] == "state"


VALUE_BOMB = '{"type": "state", "pad": [' + "[]," * 400_000 + "[]]}"  # 1.2 MB, 400k values


async def test_json_with_too_many_values_is_refused_before_parsing(live_server) -> None:
    async with connect(ws_url(live_server), additional_headers=live_server.headers, max_size=None) as ws:
        reply = await request(ws, json.loads(json.dumps({"type": "reset", "data": {"episode_id": "bomb"}})))
        assert reply["type"] == "observation"
        await ws.send(VALUE_BOMB)
        reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert reply["type"] == "error" and "JSON values" in reply["data"]["message"], reply
        # a big frame of one string value is fine: commas inside strings are not values
        code = "x = '" + "," * 500_000 + "'\nprint(len(x))"
        reply = await request(ws, {"type": "step", "data": {"code": code}})
        assert reply["data"]["observation"]["stdout"] == "500000\n"
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=60) as http:
        for path in ("/step", "/grade"):
            reply = await http.post(path, content=VALUE_BOMB, headers={"content-type": "application/json"})
            assert reply.status_code == 422 and "JSON values" in reply.text, (path, reply.text[:300])
        reply = await http.post("/mcp", content=VALUE_BOMB, headers={"content-type": "application/json"})
        assert reply.status_code == 200 and reply.json()["error"]["code"] == -32600, reply.text[:300]
        assert "JSON values" in reply.json()["error"]["message"]


async def test_reset_options_are_bounded(live_server) -> None:
    """Options are echoed in every state reply: a big one would make each 16-byte state frame
    cost the server megabytes."""
    async with connect(ws_url(live_server), additional_headers=live_server.headers) as ws:
        reply = await request(ws, {"type": "reset", "data": {"note": "n" * 5000}})
        assert reply["type"] == "error" and reply["data"]["error_code"] == "invalid_request", reply
        reply = await request(ws, {"type": "reset", "data": {"note": "small", "episode_id": "opts"}})
        assert reply["type"] == "observation"
        state = await request(ws, {"type": "state"})
        assert state["data"]["note"] == "small"


async def test_an_inline_task_is_compiled_in_the_sandbox_not_on_the_server(live_server) -> None:
    """Compiling a client's test sources would be the server's CPU (a few KB of dense literal
    cost seconds): its grader compiles them, and reports a source that does not compile as that
    test's error."""
    task = {"id": "inline-syntax", "tests": {"kind": "asserts",
                                              "asserts": ["assert f(1) == 1", "assert ((", "assert f(2) == 2"]}}
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=120) as http:
        reply = await http.post("/grade", json={"task": task, "submission": "def f(x):\n    return x\n"})
    assert reply.status_code == 200, reply.text[:300]
    tests = {t["name"]: t for t in reply.json()["tests"]}
    assert tests["assert 0"]["status"] == tests["assert 2"]["status"] == "passed"
    assert tests["assert 1"]["status"] == "error" and "does not compile" in tests["assert 1"]["message"]


def _closed_by_server(sock: socket.socket, byte_every_s: float, bound_s: float) -> tuple[bytes, bool]:
    """Trickle a body one byte at a time until the server closes; what it answered, and whether
    it closed within `bound_s` (a bound on the test's length, not a performance figure)."""
    received, start = b"", time.monotonic()
    sock.settimeout(byte_every_s)
    while time.monotonic() - start < bound_s:
        try:
            sock.sendall(b"x")
        except OSError:
            return received, True
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return received, True
        if not data:
            return received, True
        received += data
    return received, False


async def test_a_trickled_body_does_not_hold_a_connection(live_server_factory) -> None:
    """Without a token: refused and closed at once (the body is never waited for). With one: the
    body must arrive within body_timeout_s of the headers."""
    server = live_server_factory(body_timeout_s=2.0, pool_size=0)
    head = ("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            "content-length: 1000000\r\n{auth}\r\n\r\n{{")
    for auth, status in (("x-no-token: 1", b"401"), (f"authorization: Bearer {server.token}", None)):
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) as sock:
            sock.sendall(head.format(auth=auth).encode())
            received, closed = await asyncio.to_thread(_closed_by_server, sock, 0.2, 60.0)
        assert closed, f"still open after a minute ({auth})"
        if status is not None:
            assert received.split(b" ", 2)[1] == status, received[:200]


async def test_the_value_count_itself_is_linear(live_server) -> None:
    """An unterminated string full of escaped quotes once made the check quadratic (700 KB took
    tens of minutes, the loop blocked): each string is scanned once now. A hang fails by the
    suite's timeout; the answers are what is asserted."""
    attack = b"," * (100_001) + b'"' + b'\\"' * 300_000
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=60) as http:
        reply = await http.post("/step", content=attack, headers={"content-type": "application/json"})
        assert reply.status_code == 422 and "JSON values" in reply.text
        assert (await http.get("/healthz")).status_code == 200
    async with connect(ws_url(live_server), additional_headers=live_server.headers, max_size=None) as ws:
        await ws.send(attack.decode())
        reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert reply["type"] == "error" and "JSON values" in reply["data"]["message"]


async def test_many_wrong_values_give_a_short_answer(live_server) -> None:
    """Every wrong value is an error of pydantic's: the reply lists the first few, and a message
    is cut, whatever the client sent (a 400 KB task once gave a 31 MB reply and log line)."""
    task = {"id": "t", "tests": {"kind": "asserts", "asserts": ["assert True"]}, "public_tests": [1] * 40_000}
    extra = {"type": "state", **{f"k{i}": 0 for i in range(30_000)}}
    async with connect(ws_url(live_server), additional_headers=live_server.headers, max_size=None) as ws:
        for frame in ({"type": "reset", "data": {"task": task}}, extra):
            raw = await request_raw(ws, frame)
            assert len(raw) < 20_000, len(raw)
            assert json.loads(raw)["data"]["code"] == "VALIDATION_ERROR"
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=60) as http:
        reply = await http.post("/grade", json={"task": task, "submission": "x = 1"})
        assert reply.status_code == 422 and len(reply.content) < 20_000, len(reply.content)
        spec = "binary:" + "zz=1," * 20_000
        reply = await http.post("/grade", json={"task": {**task, "public_tests": None, "reward": spec[:150]},
                                                "submission": "x = 1"})
        assert reply.status_code == 422 and "reward" in reply.text, reply.text[:300]  # before any sandbox ran
        reply = await http.post("/grade", json={"task": {**task, "public_tests": None, "reward": spec},
                                                "submission": "x = 1"})
        assert reply.status_code == 422 and len(reply.content) < 20_000


async def request_raw(ws, frame: dict) -> str:
    await ws.send(json.dumps(frame))
    return await asyncio.wait_for(ws.recv(), 60)


def test_a_probe_with_a_body_closes_its_connection(live_server) -> None:
    """Probes take no token: one that announces a body is answered, then its connection closed
    (else a body trickled after the answer held it until body_timeout_s)."""
    with socket.create_connection(("127.0.0.1", port_of(live_server)), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 10\r\n\r\nx")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and b"connection: close" in received.lower()


async def test_a_test_source_too_deep_to_compile_is_that_tests_error(live_server) -> None:
    """Nesting past the compiler's recursion limit is a source that does not compile, like a
    syntax error: that test's error, the others graded (it once ended the grader)."""
    deep = "assert " + "1+" * 200_000 + "1"
    task = {"id": "inline-deep", "tests": {"kind": "asserts", "asserts": ["assert f(1) == 1", deep]}}
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=120) as http:
        reply = await http.post("/grade", json={"task": task, "submission": "def f(x):\n    return x\n"})
    assert reply.status_code == 200, reply.text[:300]
    tests = {t["name"]: t for t in reply.json()["tests"]}
    assert tests["assert 0"]["status"] == "passed", tests
    assert tests["assert 1"]["status"] == "error" and "does not compile" in tests["assert 1"]["message"], tests
