"""Tenancy (issue #9, item 2): each token is a tenant, the admin sees all; quotas; idle reaping.

The findings reproduced here: `/episodes` listed every live episode, `/episodes/{id}` showed
another client's variables, `DELETE` closed it; MCP sessions took every slot unseen; idle
sessions were never reaped.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ALICE, BOB = "alice-token-" + "a" * 20, "bob-token-" + "b" * 22
SECRET = "sk-live-" + "9" * 24
SLOW_TASK = {"id": "slow", "prompt": "", "tests": {"kind": "asserts",
                                                   "asserts": ["__import__('time').sleep(4) or True"]}}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws"


async def request(ws, frame: dict) -> dict:
    await ws.send(json.dumps(frame))
    return json.loads(await asyncio.wait_for(ws.recv(), 60))


def rpc(method: str, **params) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


@pytest.fixture
def tenants_server(live_server_factory):
    return lambda **settings: live_server_factory(tenants={"alice": ALICE, "bob": BOB}, **settings)


async def test_a_tenant_sees_and_touches_only_its_own_episodes(tenants_server) -> None:
    server = tenants_server(max_sessions=4)
    async with connect(ws_url(server), additional_headers=bearer(ALICE), open_timeout=10) as alice, \
            httpx.AsyncClient(base_url=server.url, headers=bearer(BOB), timeout=60) as bob, \
            httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as admin:
        assert (await request(alice, {"type": "reset", "data": {"episode_id": "alice-ep"}}))["type"] == "observation"
        await request(alice, {"type": "step", "data": {"code": f"API_KEY = {SECRET!r}"}})

        listing = await bob.get("/episodes")
        assert listing.status_code == 200 and listing.json()["episodes"] == []
        assert "alice-ep" not in listing.text and "pools" not in listing.json()
        for method in ("GET", "DELETE"):
            reply = await bob.request(method, "/episodes/alice-ep")
            assert reply.status_code == 404 and SECRET not in reply.text, (method, reply.text)
        page = await bob.get("/web/episodes/alice-ep")  # a static page: its data is the 404 above
        assert SECRET not in page.text

        mine = (await request(alice, {"type": "step", "data": {"code": "print(API_KEY[:8])"}}))
        assert mine["data"]["observation"]["stdout"] == "sk-live-\n"  # untouched by bob's DELETE

        everyone = (await admin.get("/episodes")).json()["episodes"]
        assert [(e["id"], e["owner"]) for e in everyone] == [("alice-ep", "alice")]
        shown = (await admin.get("/episodes/alice-ep")).json()
        assert any(v["name"] == "API_KEY" for v in shown["kernel"]["variables"])
        own = (await httpx.AsyncClient(base_url=server.url, headers=bearer(ALICE)).get("/episodes")).json()
        assert [e["id"] for e in own["episodes"]] == ["alice-ep"]
        assert (await admin.delete("/episodes/alice-ep")).status_code == 200  # the admin may close it
        closed = await request(alice, {"type": "step", "data": {"code": "print(1)"}})
        assert closed["type"] == "error" and closed["data"]["error_code"] == "episode_closed"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(alice.recv(), 30)


async def test_mcp_sessions_are_episodes_listed_and_closable_before_any_step(tenants_server) -> None:
    server = tenants_server(max_sessions=6)
    async with httpx.AsyncClient(base_url=server.url, headers=bearer(ALICE), timeout=60) as alice, \
            httpx.AsyncClient(base_url=server.url, headers=bearer(BOB), timeout=60) as bob:
        created = [(await alice.post("/mcp", json=rpc("openenv/session/create"))).json()["result"]["session_id"]
                   for _ in range(6)]
        full = (await bob.post("/mcp", json=rpc("openenv/session/create"))).json()
        assert full["error"]["data"]["code"] == "capacity_reached"

        listed = (await alice.get("/episodes")).json()["episodes"]
        assert sorted(e["id"] for e in listed) == sorted(created)
        assert all(e["episode_id"] is None and e["step_count"] == 0 for e in listed)
        assert (await bob.get("/episodes")).json()["episodes"] == []

        victim = created[0]
        # bob can neither use, close nor delete alice's session
        call = rpc("tools/call", name="run_python", arguments={"code": "print(1)"}, session_id=victim)
        assert (await bob.post("/mcp", json=call)).json()["error"]["code"] == -32602
        assert (await bob.post("/mcp", json=rpc("openenv/session/close", session_id=victim))).json()["error"]
        assert (await bob.delete(f"/episodes/{victim}")).status_code == 404

        assert (await alice.delete(f"/episodes/{victim}")).status_code == 200
        assert (await alice.post("/mcp", json=call)).json()["error"]["code"] == -32602  # gone
        fresh = (await bob.post("/mcp", json=rpc("openenv/session/create"))).json()["result"]["session_id"]
        used = rpc("tools/call", name="run_python", arguments={"code": "print('bob')"}, session_id=fresh)
        assert (await bob.post("/mcp", json=used)).json()["result"]["content"][0]["text"] == "bob\n"
        assert [e["session_id"] for e in (await bob.get("/episodes")).json()["episodes"]] == [fresh]


async def test_each_tenant_has_a_session_quota(tenants_server) -> None:
    server = tenants_server(max_sessions=6, tenant_max_sessions=2, pool_size=0)
    async with connect(ws_url(server), additional_headers=bearer(ALICE), open_timeout=10) as a1, \
            connect(ws_url(server), additional_headers=bearer(ALICE), open_timeout=10) as a2:
        for ws in (a1, a2):
            assert (await request(ws, {"type": "state"}))["type"] == "state"
        async with connect(ws_url(server), additional_headers=bearer(ALICE), open_timeout=10) as a3:
            refused = json.loads(await asyncio.wait_for(a3.recv(), 30))
            assert refused["data"]["code"] == "CAPACITY_REACHED", refused
            assert (refused["data"]["active_sessions"], refused["data"]["max_sessions"]) == (2, 2)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(a3.recv(), 30)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            over = await http.post("/step", json={"action": {"code": "1"}}, headers=bearer(ALICE))
            assert over.status_code == 429 and over.json()["detail"]["code"] == "quota_exceeded"
            assert over.headers["retry-after"]
            ok = await http.post("/step", json={"action": {"code": "print(7)"}}, headers=bearer(BOB))
            assert ok.status_code == 200 and ok.json()["observation"]["stdout"] == "7\n"


async def test_each_tenant_has_a_concurrent_grading_quota(tenants_server) -> None:
    server = tenants_server(max_sessions=6, tenant_max_gradings=1)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        body = {"task": SLOW_TASK, "submission": "pass"}
        first = asyncio.create_task(http.post("/grade", json=body, headers=bearer(ALICE)))
        deadline = time.monotonic() + 60
        while server.manager.gradings.get("alice", 0) < 1:
            assert time.monotonic() < deadline and not first.done(), "the first grading never started"
            await asyncio.sleep(0.02)
        second = await http.post("/grade", json=body, headers=bearer(ALICE))
        assert second.status_code == 429 and second.json()["detail"]["quota"] == "concurrent gradings"
        other = await http.post("/grade", json={"task": {**SLOW_TASK, "tests": {
            "kind": "asserts", "asserts": ["assert True"]}}, "submission": "pass"}, headers=bearer(BOB))
        assert other.status_code == 200 and other.json()["reward"] == 1.0
        assert (await first).status_code == 200


async def test_idle_sessions_are_reaped_by_default_and_pings_are_not_activity(live_server, tenants_server) -> None:
    assert live_server.settings.session_timeout_s == 600.0  # on unless configured otherwise
    server = tenants_server(max_sessions=2, session_timeout_s=2.0, pool_size=0)
    async with httpx.AsyncClient(base_url=server.url, headers=bearer(ALICE), timeout=60) as alice:
        session = (await alice.post("/mcp", json=rpc("openenv/session/create"))).json()["result"]["session_id"]
        # the client pings far more often than the timeout; only requests are activity
        async with connect(ws_url(server), additional_headers=bearer(ALICE), ping_interval=0.2,
                           open_timeout=10) as ws:
            await request(ws, {"type": "state"})
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 60)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        deadline = time.monotonic() + 60
        while (await alice.get("/episodes")).json()["episodes"]:
            assert time.monotonic() < deadline, "the idle MCP session was never reaped"
            await asyncio.sleep(0.2)
        call = rpc("tools/call", name="run_python", arguments={"code": "1"}, session_id=session)
        assert (await alice.post("/mcp", json=call)).json()["error"]["code"] == -32602


async def test_gradings_count_toward_the_session_quota_checked_before_the_task(tenants_server) -> None:
    """The finding: with tenant_max_sessions=3 one tenant ran 8 gradings at once, took every slot,
    and its /episodes said active 0. Its gradings are its sessions now, and a grading over the
    quota is refused before the client's task is even parsed."""
    server = tenants_server(max_sessions=8, tenant_max_sessions=3)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        body = {"task": SLOW_TASK, "submission": "pass"}
        running = [asyncio.create_task(http.post("/grade", json=body, headers=bearer(ALICE))) for _ in range(3)]
        deadline = time.monotonic() + 60
        while server.manager.gradings.get("alice", 0) < 3:
            assert time.monotonic() < deadline and not any(t.done() for t in running), "gradings never started"
            await asyncio.sleep(0.02)
        over = await http.post("/grade", json=body, headers=bearer(ALICE))
        assert over.status_code == 429 and over.json()["detail"]["quota"] == "sessions", over.text
        broken = await http.post("/grade", json={"task": {"id": "x", "tests": "not tests"}, "submission": "pass"},
                                 headers=bearer(ALICE))
        assert broken.status_code == 429, broken.text  # not 422: the task was never looked at
        step = await http.post("/step", json={"action": {"code": "1"}}, headers=bearer(ALICE))
        assert step.status_code == 429 and step.json()["detail"]["quota"] == "sessions"
        assert (await http.get("/episodes", headers=bearer(ALICE))).json()["active"] == 3
        other = await http.post("/step", json={"action": {"code": "print(5)"}}, headers=bearer(BOB))
        assert other.status_code == 200 and other.json()["observation"]["stdout"] == "5\n"
        for grading in running:
            assert (await grading).status_code == 200


async def test_an_episode_id_two_tenants_chose_names_each_one_its_own(tenants_server) -> None:
    """The finding: bob and alice both reset with episode_id "run-42"; alice's GET and DELETE
    found bob's first and answered 404. Each tenant now finds only its own; for the admin, whom
    the id names twice, it is a 409 pointing at the session ids."""
    server = tenants_server(max_sessions=4, pool_size=2)
    async with connect(ws_url(server), additional_headers=bearer(BOB), open_timeout=10) as bob_ws, \
            connect(ws_url(server), additional_headers=bearer(ALICE), open_timeout=10) as alice_ws, \
            httpx.AsyncClient(base_url=server.url, headers=bearer(ALICE), timeout=60) as alice, \
            httpx.AsyncClient(base_url=server.url, headers=bearer(BOB), timeout=60) as bob, \
            httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as admin:
        for ws, name in ((bob_ws, "bob"), (alice_ws, "alice")):  # bob's first: the one found first before
            assert (await request(ws, {"type": "reset", "data": {"episode_id": "run-42"}}))["type"] == "observation"
            await request(ws, {"type": "step", "data": {"code": f"who = {name!r}"}})

        for client, name in ((alice, "alice"), (bob, "bob")):
            shown = await client.get("/episodes/run-42")
            assert shown.status_code == 200 and shown.json()["summary"]["owner"] == name, shown.text
        ambiguous = await admin.get("/episodes/run-42")
        assert ambiguous.status_code == 409 and "session_id" in ambiguous.json()["detail"]["message"]
        assert (await admin.delete("/episodes/run-42")).status_code == 409
        sessions = {e["owner"]: e["session_id"] for e in (await admin.get("/episodes")).json()["episodes"]}
        assert (await admin.get(f"/episodes/{sessions['bob']}")).json()["summary"]["owner"] == "bob"

        assert (await alice.delete("/episodes/run-42")).status_code == 200  # alice's own, not bob's
        mine = await request(bob_ws, {"type": "step", "data": {"code": "print(who)"}})
        assert mine["data"]["observation"]["stdout"] == "bob\n"
        assert (await admin.get("/episodes/run-42")).json()["summary"]["owner"] == "bob"
        # a tenant's probe is a stranger's: the counts are the admin's
        assert (await bob.get("/readyz")).json() == {"status": "ready"}
