"""Authentication and the request gate (issue #9, item 1), as a stranger or a hostile page tries it.

Every server here is real uvicorn on loopback with auth on (the default); `live_server.headers`
authenticate as the admin.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sandbox_env import SandboxEnv, errors
from sandbox_env.errors import ConfigError


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws"

RUN_PRINT = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
             "params": {"name": "run_python", "arguments": {"code": "print('ran')"}}}


def executions(metrics_text: str) -> float:
    """Steps the server ran, from its Prometheus counters."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith("sandbox_env_executions_total{"))


async def handshake_status(server, headers: dict[str, str]) -> int:
    """Status line of a raw `/ws` upgrade with exactly these headers (Host included)."""
    port = int(server.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = ["GET /ws HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    return int(status.split()[1])


@pytest.fixture
async def anonymous(live_server):
    async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as client:
        yield client


@pytest.fixture
async def admin(live_server):
    async with httpx.AsyncClient(base_url=live_server.url, timeout=60, headers=live_server.headers) as client:
        yield client


PROTECTED = [("POST", "/step", {"action": {"code": "print(1)"}}), ("POST", "/reset", {}),
             ("GET", "/state", None), ("POST", "/mcp", RUN_PRINT), ("GET", "/episodes", None),
             ("GET", "/episodes/x", None), ("DELETE", "/episodes/x", None), ("GET", "/web", None),
             ("GET", "/web/episodes/x", None), ("GET", "/metrics", None), ("GET", "/schema", None),
             ("GET", "/metadata", None), ("GET", "/openapi.json", None), ("GET", "/docs", None),
             ("POST", "/grade", {"task_id": "HumanEval/0", "submission": "x"})]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
async def test_every_route_but_the_probes_needs_a_token(anonymous, method, path, body) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic !!"}):
        reply = await anonymous.request(method, path, json=body, headers=headers)
        assert reply.status_code == 401, (path, headers, reply.text)
        assert reply.json()["detail"]["code"] == "unauthorized"
        assert reply.headers["www-authenticate"].startswith("Bearer")


async def test_unauthenticated_code_never_runs_but_probes_answer(live_server, anonymous, admin) -> None:
    assert (await anonymous.get("/health")).json() == {"status": "healthy"}
    assert (await anonymous.get("/healthz")).status_code == 200
    assert (await anonymous.get("/readyz")).status_code == 200
    before = executions((await admin.get("/metrics")).text)
    await anonymous.post("/mcp", json=RUN_PRINT)
    await anonymous.post("/step", json={"action": {"code": "print(1)"}})
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(live_server), open_timeout=10):
            pass
    assert refused.value.response.status_code == 401
    assert executions((await admin.get("/metrics")).text) == before


async def test_bearer_basic_and_query_tokens_are_accepted(live_server, anonymous) -> None:
    assert (await anonymous.get("/episodes")).status_code == 401
    token = live_server.token
    basic = base64.b64encode(f"anyone:{token}".encode()).decode()
    for headers, params in (({"Authorization": f"Bearer {token}"}, None),
                            ({"Authorization": f"token {token}"}, None),
                            ({"Authorization": f"Basic {basic}"}, None), ({}, {"token": token})):
        reply = await anonymous.get("/episodes", headers=headers, params=params)
        assert reply.status_code == 200, (headers, params, reply.text)


async def test_the_page_trades_the_query_token_for_a_strict_httponly_cookie(live_server, anonymous) -> None:
    reply = await anonymous.get("/web", params={"token": live_server.token, "x": "1"})
    assert reply.status_code == 303 and reply.headers["location"] == "/web?x=1"
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert live_server.token not in cookie  # the cookie holds a keyed hash, never the token
    name, value = cookie.split(";", 1)[0].split("=", 1)
    async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as browser:
        page = await browser.get("/web", headers={"cookie": f"{name}={value}"})
        assert page.status_code == 200 and "<html" in page.text
        assert (await browser.get("/episodes", headers={"cookie": f"{name}={value}"})).status_code == 200
        # the raw token is no cookie, and a forged cookie value gets nothing
        for forged in (live_server.token, "0" * 64):
            assert (await browser.get("/episodes", headers={"cookie": f"{name}={forged}"})).status_code == 401


async def test_cross_site_post_to_mcp_runs_nothing(live_server, anonymous, admin) -> None:
    """The issue's finding: text/plain + foreign Origin + foreign Host ran code. Each one alone,
    even with a valid token, is now refused before anything runs."""
    before = executions((await admin.get("/metrics")).text)
    body = json.dumps(RUN_PRINT)
    token = {"Authorization": f"Bearer {live_server.token}"}
    found = await anonymous.post("/mcp", content=body, headers={
        "content-type": "text/plain", "origin": "http://evil.example", "host": "evil.example"})
    assert found.status_code == 403 and found.json()["detail"]["code"] == "host_not_allowed"
    cases = [({"host": "evil.example"}, 403, "host_not_allowed"),
             ({"origin": "http://evil.example", "content-type": "application/json"}, 403, "origin_not_allowed"),
             ({"origin": "null", "content-type": "application/json"}, 403, "origin_not_allowed"),
             ({"sec-fetch-site": "cross-site", "content-type": "application/json"}, 403, "origin_not_allowed"),
             ({"content-type": "text/plain"}, 415, "unsupported_media_type"),
             ({"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
             ({}, 415, "unsupported_media_type")]
    for headers, status, code in cases:
        reply = await anonymous.post("/mcp", content=body, headers={**token, **headers})
        assert reply.status_code == status and reply.json()["detail"]["code"] == code, (headers, reply.text)
    assert executions((await admin.get("/metrics")).text) == before
    # the same request, same-origin and JSON, does run
    own = f"http://127.0.0.1:{live_server.url.rsplit(':', 1)[1]}"
    reply = await anonymous.post("/mcp", content=body, headers={**token, "origin": own,
                                                                 "content-type": "application/json"})
    assert reply.json()["result"]["content"][0]["text"] == "ran\n"


async def test_websocket_with_a_foreign_origin_or_host_is_refused(live_server) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(live_server), origin="http://evil.example",
                           additional_headers=live_server.headers, open_timeout=10):
            pass
    assert refused.value.response.status_code == 403
    auth = live_server.headers
    port = live_server.url.rsplit(":", 1)[1]
    assert await handshake_status(live_server, {"Host": "evil.example", **auth}) == 403
    assert await handshake_status(live_server, {"Host": f"rebound.example:{port}", **auth}) == 403
    assert await handshake_status(live_server, {"Host": f"127.0.0.1:{port}", **auth}) == 101
    assert await handshake_status(live_server, {"Host": f"localhost:{port}", **auth,
                                                "Origin": f"http://localhost:{port}"}) == 101
    async with connect(ws_url(live_server), origin=f"http://127.0.0.1:{port}",
                       additional_headers=auth, open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "step", "data": {"code": "print(2)"}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 60))["data"]["observation"]["stdout"] == "2\n"


async def test_configured_hosts_and_origins_are_served(live_server_factory) -> None:
    server = live_server_factory(allowed_hosts=["sandbox.internal"], allowed_origins=["https://ui.example"],
                                 pool_size=0)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30) as http:
        assert (await http.get("/episodes", headers={"host": "sandbox.internal:8000"})).status_code == 200
        assert (await http.get("/episodes", headers={"host": "other.internal"})).status_code == 403
        reply = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                headers={"origin": "https://ui.example"})
        assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers


async def test_there_is_no_cors(admin, anonymous) -> None:
    # a page elsewhere cannot even get an error it could read: refused, and no CORS either way
    refused = await anonymous.post("/step", json={"action": {"code": "1"}}, headers={"origin": "http://evil.example"})
    assert refused.status_code in (401, 403) and "access-control-allow-origin" not in refused.headers
    preflight = await admin.options("/step", headers={"origin": "http://evil.example",
                                                      "access-control-request-method": "POST"})
    assert not any(h.startswith("access-control-") for h in preflight.headers)
    reply = await admin.get("/episodes", headers={"origin": "http://evil.example"})
    assert not any(h.startswith("access-control-") for h in reply.headers)


async def test_validation_errors_never_echo_the_input(admin) -> None:
    secret = "sk-live-" + "5" * 24
    for path, body in (("/step", {"action": {"code": secret}, "timeout_s": secret}),
                       ("/step", {"action": {"code": secret}, "extra": secret, "timeout_s": -1}),
                       ("/grade", {"submission": secret, "bogus": secret}),
                       ("/reset", {"seed": secret}),
                       ("/grade", [secret])):
        reply = await admin.post(path, json=body)
        assert reply.status_code == 422, reply.text
        assert secret not in reply.text, reply.text
        for error in reply.json()["detail"]:
            assert set(error) == {"loc", "type", "msg"}
    bad_json = await admin.post("/step", content=b'{"action": {"code": "' + secret.encode() + b'"',
                                headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and secret not in bad_json.text


async def test_our_client_sends_the_token_and_reports_a_bad_one(live_server) -> None:
    async with SandboxEnv(live_server.url, token=live_server.token) as env:
        assert (await env.step("print(3)")).observation.stdout == "3\n"
    with pytest.raises(errors.AuthError):
        async with SandboxEnv(live_server.url, token="not-the-token-at-all") as env:
            await env.reset()
    with pytest.raises(errors.AuthError):
        await SandboxEnv(live_server.url, token="").grade("x", task_id="HumanEval/0")
    with pytest.raises(errors.ForbiddenError):
        async with SandboxEnv(live_server.url, headers={**live_server.headers, "Origin": "http://evil.example"}) as env:
            await env.reset()


def test_no_auth_is_refused_on_a_non_loopback_bind() -> None:
    from sandbox_env.server.app import create_app
    from sandbox_env.settings import Settings

    with pytest.raises(ConfigError, match="without authentication"):
        create_app(Settings(auth=False, host="0.0.0.0", pool_size=0))
    create_app(Settings(auth=False, host="0.0.0.0", allow_remote_no_auth=True, pool_size=0))
    create_app(Settings(auth=False, host="127.0.0.1", pool_size=0))
    out = subprocess.run([sys.executable, "-m", "sandbox_env.cli", "serve", "--no-auth", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "SANDBOX_ENV_POOL_SIZE": "0"})
    assert out.returncode == 2 and "without authentication" in out.stderr, out.stderr


async def test_no_auth_on_loopback_serves_without_a_token(live_server_factory) -> None:
    server = live_server_factory(auth=False, pool_size=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.get("/episodes")).status_code == 200
        # the gate still stands without auth: a rebinding page gets nothing
        assert (await http.get("/episodes", headers={"host": "evil.example"})).status_code == 403


async def test_token_file_sets_the_token(live_server_factory, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-" + "7" * 20 + "\n")
    server = live_server_factory(token=None, token_file=str(path), pool_size=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        ok = await http.get("/episodes", headers={"Authorization": "Bearer file-token-" + "7" * 20})
        assert ok.status_code == 200
        assert (await http.get("/episodes", headers=server.headers if server.token != path.read_text().strip()
                               else {})).status_code == 401


def test_serve_generates_a_token_and_prints_a_ready_url(tmp_path: Path) -> None:
    """`sandbox-env serve` without a configured token makes one and prints where to paste it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_ENV_")}
    env["SANDBOX_ENV_POOL_SIZE"] = "0"
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "sandbox_env.cli", "serve", "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            match = re.search(rf"http://127\.0\.0\.1:{port}/web\?token=([0-9a-f]{{48}})", log.read_text())
            url = match and match.group(0)
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        token = url.rsplit("=", 1)[1]
        while httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code != 200:
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/episodes", timeout=10).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/episodes", timeout=10,
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200
        page = httpx.get(url, timeout=10, follow_redirects=True)
        assert page.status_code == 200 and "sandbox-env episodes" in page.text
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("level", ["info", "debug"])
def test_tokens_in_urls_never_reach_the_log(tmp_path: Path, level: str) -> None:
    """uvicorn logs each request's path with its query: `/web?token=…`, `/ws?token=…` and a
    refused near miss are logged with `token=[redacted]`; at debug, websockets logs each
    handshake header: Authorization and Cookie are logged `[redacted]`."""
    import socket

    from websockets.sync.client import connect as connect_sync

    token = os.environ["SANDBOX_ENV_TOKEN"]  # configured, so the banner never prints it either
    near_miss = token[:-4] + "beef"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "sandbox_env.cli", "serve", "--port", str(port),
                                 "--log-level", level], cwd=tmp_path, stdout=sink, stderr=sink,
                                env={**os.environ, "SANDBOX_ENV_POOL_SIZE": "0"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{root}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert httpx.get(f"{root}/web", params={"token": token}, timeout=10).status_code == 303
        assert httpx.get(f"{root}/episodes", params={"token": token}, timeout=10).status_code == 200
        with connect_sync(f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=10) as ws:
            ws.send(json.dumps({"type": "state"}))
            assert json.loads(ws.recv(30))["type"] == "state"
        with pytest.raises(InvalidStatus):
            connect_sync(f"ws://127.0.0.1:{port}/ws?x=1&token={near_miss}", open_timeout=10)
        with connect_sync(f"ws://127.0.0.1:{port}/ws", open_timeout=10,
                          additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            ws.send(json.dumps({"type": "state"}))
            assert json.loads(ws.recv(30))["type"] == "state"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    text = log.read_text()
    assert text.count("token=[redacted]") >= 4, text  # the lines were logged, the tokens were not
    assert token not in text and near_miss not in text, text


async def test_a_token_url_opened_from_another_site_is_refused(live_server, anonymous) -> None:
    """Login CSRF: a link elsewhere to `/web?token=<the attacker's>` must not replace the
    victim's cookie. Only a navigation the user made trades the token for a cookie."""
    for site in ("cross-site", "same-site"):
        reply = await anonymous.get("/web", params={"token": live_server.token}, headers={"sec-fetch-site": site})
        assert reply.status_code == 403 and "set-cookie" not in reply.headers, (site, reply.text)
        assert "address bar" in reply.json()["detail"]["message"]
    for site in ("none", "same-origin"):
        reply = await anonymous.get("/web", params={"token": live_server.token}, headers={"sec-fetch-site": site})
        assert reply.status_code == 303 and "set-cookie" in reply.headers, (site, reply.text)


async def test_readyz_tells_a_stranger_only_its_status(anonymous, admin) -> None:
    """The probe needs no token and skips the Host check: it says "ready", nothing more, unless
    the admin's token comes from an allowed Host."""
    for headers in ({}, {"host": "evil.example"}, {"Authorization": "Bearer wrong-token-wrong-token"}):
        reply = await anonymous.get("/readyz", headers=headers)
        assert reply.status_code == 200 and reply.json() == {"status": "ready"}, (headers, reply.text)
    counted = (await admin.get("/readyz")).json()
    assert counted["status"] == "ready" and counted["max_sessions"] == 8 and "active_sessions" in counted
    assert (await admin.get("/readyz", headers={"host": "evil.example"})).json() == {"status": "ready"}


async def test_probes_answer_head_without_a_token(anonymous) -> None:
    for path in ("/health", "/healthz", "/readyz"):
        reply = await anonymous.head(path)
        assert reply.status_code == 200 and reply.content == b"", (path, reply.status_code)
