"""Limits a client cannot lift (issue #9, item 3): policies, per-test timeouts, grading budget,
inline tasks.

The findings: an inline task's `timeout_s: 25` held a sandbox for 20 s under the 10 s default
policy; any client could pick the laxer `trusted-eval` policy.
"""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.asyncio.client import connect


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws"


def sleeping_task(count: int = 1, timeout_s: float | None = None) -> dict:
    """Each test calls the submission's `slow()` (the grader times calls into the submission)."""
    task = {"id": "sleepy", "prompt": "", "tests": {"kind": "asserts", "asserts": ["assert slow()"] * count}}
    if timeout_s is not None:
        task["timeout_s"] = timeout_s
    return task


def sleeper(seconds: float) -> str:
    return f"def slow():\n    import time\n    time.sleep({seconds})\n    return True\n"


async def ws_reset(server, **data) -> dict:
    async with connect(ws_url(server), additional_headers=server.headers, open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "reset", "data": data}))
        return json.loads(await ws.recv())


async def test_only_the_servers_own_policy_unless_configured(live_server_factory) -> None:
    server = live_server_factory(pool_size=0)  # the defaults
    refused = await ws_reset(server, policy="trusted-eval")
    assert refused["type"] == "error" and refused["data"]["error_code"] == "policy_not_found", refused
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
        assert (await http.post("/reset", json={"policy": "strict"})).status_code == 422
        graded = await http.post("/grade", json={"task": sleeping_task(), "submission": sleeper(0), "policy": "trusted-eval"})
        assert graded.status_code == 422 and graded.json()["detail"]["code"] == "policy_not_found"
        assert (await http.post("/reset", json={"policy": "default"})).status_code == 200
    opened = live_server_factory(pool_size=0, allowed_policies=["default", "strict"])
    assert (await ws_reset(opened, policy="strict"))["data"]["metadata"]["policy"] == "strict"
    assert (await ws_reset(opened, policy="trusted-eval"))["type"] == "error"


async def test_an_inline_tasks_timeout_is_clamped_to_the_policy(live_server) -> None:
    """25 s asked, 10 s (the default policy's step limit) given: a 12 s test times out."""
    reset = await ws_reset(live_server, task=sleeping_task(timeout_s=25))
    assert reset["data"]["metadata"]["task"]["timeout_s"] == 10.0
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers, timeout=120) as http:
        reply = await http.post("/grade", json={"task": sleeping_task(timeout_s=25), "submission": sleeper(12)})
    grading = reply.json()
    assert reply.status_code == 200 and grading["status"] == "graded", reply.text
    assert grading["tests"][0]["status"] == "timeout" and grading["reward"] == 0.0


async def test_the_grading_budget_of_an_inline_task_is_clamped(live_server_factory) -> None:
    """Three 5 s tests under a 16 s budget (10 s of it start-up allowance): 2 s each, all time out."""
    server = live_server_factory(max_grading_s=16, pool_size=1)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as http:
        reply = await http.post("/grade", json={"task": sleeping_task(count=3, timeout_s=10), "submission": sleeper(5)})
    grading = reply.json()
    assert grading["status"] == "graded", reply.text
    assert [t["status"] for t in grading["tests"]] == ["timeout"] * 3


async def test_inline_tasks_can_be_turned_off(live_server_factory, tmp_path) -> None:
    served = {"id": "served", "prompt": "Define one.", "tests": {"kind": "asserts", "asserts": ["assert one == 1"]}}
    (tmp_path / "tasks.json").write_text(json.dumps([served]))
    server = live_server_factory(allow_inline_tasks=False, tasks=str(tmp_path / "tasks.json"), pool_size=1)
    refused = await ws_reset(server, task=sleeping_task())
    assert refused["type"] == "error" and refused["data"]["error_code"] == "invalid_task", refused
    assert "turned off" in refused["data"]["message"]
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as http:
        inline = await http.post("/grade", json={"task": sleeping_task(), "submission": sleeper(0)})
        assert inline.status_code == 422 and "turned off" in inline.json()["detail"]["message"]
        mcp_free = await http.post("/grade", json={"task_id": "served", "submission": "one = 1"})
        assert mcp_free.status_code == 200 and mcp_free.json()["reward"] == 1.0
    assert (await ws_reset(server, task_id="served"))["type"] == "observation"


@pytest.mark.parametrize("asked", [25.0, None])
def test_limit_inline_never_extends(asked) -> None:
    """The clamp itself: at most the policy, at most the budget, never more than asked."""
    from sandbox_env.grading.tasks import parse_task
    from sandbox_env.manager import EpisodeManager
    from sandbox_env.policy import load_policy
    from sandbox_env.settings import Settings

    manager = EpisodeManager(Settings(pool_size=0, max_grading_s=40))
    task = parse_task(sleeping_task(count=2, timeout_s=asked))
    assert manager.limit_inline(task, load_policy("default")).timeout_s == 10.0
    assert manager.limit_inline(parse_task(sleeping_task(count=6, timeout_s=asked)),
                                load_policy("default")).timeout_s == 5.0
    assert manager.limit_inline(parse_task(sleeping_task(timeout_s=3)), load_policy("default")).timeout_s == 3
