"""POST /grade/batch on a real server and real kernels: the stream, dedupe, bad input, auth,
fairness between batches, a client that goes away, and the clients that use it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from sandbox_env import SandboxEnv
from sandbox_env.client.trl import code_reward

ADD = {"id": "add", "prompt": "", "tests": {"kind": "stdio", "cases": [
    {"input": f"{i} {i + 1}\n", "output": f"{2 * i + 1}\n"} for i in range(10)]}}
GOOD = "a, b = map(int, input().split())\nprint(a + b)\n"
WRONG = "print(0)\n"
SLEEPY = {"id": "sleepy", "prompt": "", "timeout_s": 10, "tests": {"kind": "stdio", "cases": [
    {"input": "", "output": "x\n"} for _ in range(5)]}}


def lines_of(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def post(live: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{live.url}/grade/batch", json=body, headers=live.headers if headers is None else headers,
                      timeout=300)


def test_one_line_per_item_then_a_summary_and_duplicates_graded_once(live_server: Any) -> None:
    items = [{"task": ADD, "submission": GOOD, "id": "a"}, {"task": ADD, "submission": WRONG, "id": 7},
             {"task": ADD, "submission": GOOD, "id": "again"}, {"task": ADD, "submission": GOOD, "reward": "fraction"},
             {"task_id": "no-such-task", "submission": GOOD}]
    reply = post(live_server, {"items": items})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/x-ndjson")
    lines = lines_of(reply)
    assert [line["type"] for line in lines[:-1]].count("result") == 4 and lines[-1]["type"] == "summary"
    by_index = {line["index"]: line for line in lines[:-1]}
    assert sorted(by_index) == [0, 1, 2, 3, 4]
    assert by_index[0]["id"] == "a" and by_index[1]["id"] == 7 and "id" not in by_index[3]
    good, wrong = by_index[0]["grading"], by_index[1]["grading"]
    assert good["status"] == "graded" and good["reward"] == 1.0 and good["passed"] == good["total"] == 10
    assert [t["status"] for t in good["tests"]] == ["passed"] * 10  # per-test results ride along
    assert wrong["reward"] == 0.0 and {t["status"] for t in wrong["tests"]} == {"failed"}
    assert by_index[2]["grading"] == good  # the duplicate shares the one grading
    assert by_index[3]["grading"]["reward"] == 1.0  # another reward policy: graded on its own
    assert by_index[4]["type"] == "error" and by_index[4]["error"]["code"] == "task_not_found"
    assert lines[0]["index"] == 4  # refused items come first, before any grading finishes
    summary = lines[-1]["summary"]
    assert summary == {**summary, "items": 5, "gradings": 3, "deduplicated": 1, "graded": 4, "errors": 1,
                       "infra_errors": 0}


def test_bad_batches_are_refused_before_streaming(live_server_factory: Callable[..., Any]) -> None:
    live = live_server_factory(batch_max_items=3, max_sessions=2)
    item = {"task": ADD, "submission": GOOD}
    too_many = post(live, {"items": [item] * 4})
    assert too_many.status_code == 413 and "at most 3" in too_many.json()["detail"]["message"]
    empty = post(live, {"items": []})
    assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body", "items"]
    both = post(live, {"items": [{**item, "task_id": "add"}]})
    assert both.status_code == 422 and "exactly one of task and task_id" in both.text
    policy = post(live, {"items": [item], "policy": "../etc/passwd"})
    assert policy.status_code == 422 and policy.json()["detail"]["code"] == "policy_not_found"
    assert post(live, {"items": [item]}, headers={}).status_code == 401
    assert post(live, {"items": [item]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    bad_reward = lines_of(post(live, {"items": [{**item, "reward": "no-such-reward"}]}))
    assert bad_reward[0]["type"] == "error" and bad_reward[0]["error"]["code"] == "invalid_task"


async def test_a_small_batch_is_not_starved_by_a_large_one(live_server_factory: Callable[..., Any]) -> None:
    """Two slots, a 16-item batch under way, then a 3-item batch: the gate alternates between
    them, so the small one finishes while the large one still has most of its items to go
    (first come first served would put all 3 after the 15 still queued)."""
    live = live_server_factory(max_sessions=2, batch_parallel=16)  # all 16 wait for a slot at once
    big = {"items": [{"task": ADD, "submission": GOOD + f"# {i}\n"} for i in range(16)], "parallel": 16}
    small = {"items": [{"task": ADD, "submission": GOOD + f"# small {i}\n"} for i in range(3)]}
    arrivals: list[str] = []
    big_started = asyncio.Event()

    async def run(name: str, body: dict[str, Any], http: httpx.AsyncClient) -> None:
        async with http.stream("POST", f"{live.url}/grade/batch", json=body) as reply:
            async for line in reply.aiter_lines():
                if line.strip() and json.loads(line)["type"] == "result":
                    arrivals.append(name)
                    big_started.set()

    async with httpx.AsyncClient(headers=live.headers, timeout=300) as http:
        first = asyncio.create_task(run("big", big, http))
        await big_started.wait()
        await run("small", small, http)
        await first
    last_small = max(i for i, name in enumerate(arrivals) if name == "small")
    assert arrivals.count("big") == 16 and arrivals.count("small") == 3
    # big's line that started the small batch, its 2 in flight, 3 interleaved turns, 1 of slack
    assert arrivals[:last_small].count("big") <= 7, arrivals


async def test_a_client_that_goes_away_cancels_its_gradings(live_server_factory: Callable[..., Any]) -> None:
    live = live_server_factory(max_sessions=2)
    manager = live.manager
    body = {"items": [{"task": SLEEPY, "submission": f"import time\ntime.sleep(3600)  # {i}\n"} for i in range(6)]}
    async with httpx.AsyncClient(headers=live.headers, timeout=300) as http:
        async with http.stream("POST", f"{live.url}/grade/batch", json=body) as reply:
            assert reply.status_code == 200
            while manager.grading < 2:  # both slots taken; each grading would run 5 x 10 s
                await asyncio.sleep(0.05)
    # The connection is closed: the two gradings stop long before their 50 s, the four waiting never start.
    deadline = time.monotonic() + 30
    while manager.grading and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert manager.grading == 0
    gate = live.app.state.batch_gate
    assert gate.granted == 2 and gate.waiting == 0


async def test_client_grade_batch_and_code_reward(live_server: Any) -> None:
    async with SandboxEnv(live_server.url) as env:
        lines = [line async for line in env.grade_batch(
            [{"task": ADD, "submission": GOOD, "id": "x"}, {"task": ADD, "submission": WRONG}])]
    assert [line.type for line in lines][-1] == "summary" and lines[-1].summary is not None
    results = {line.index: line for line in lines if line.type == "result"}
    assert results[0].id == "x" and results[0].grading is not None and results[0].grading.reward == 1.0
    assert results[1].grading is not None and len(results[1].grading.tests) == 10
    rewards = await asyncio.to_thread(code_reward, [f"```python\n{GOOD}```", WRONG, GOOD], task=[ADD] * 3,
                                      base_url=live_server.url)
    assert rewards == [1.0, 0.0, 1.0]


def test_sync_grade_batch(live_server: Any) -> None:
    with SandboxEnv(live_server.url).sync() as env:
        lines = list(env.grade_batch([{"task": ADD, "submission": GOOD}]))
    assert [line.type for line in lines] == ["result", "summary"] and lines[0].grading.reward == 1.0


def test_eval_server_grades_through_the_batch_route(tmp_path: Path, live_server_factory: Callable[..., Any]) -> None:
    from sandbox_env.evaluation import evaluate

    live = live_server_factory(max_sessions=4)
    problem = {"task_id": "t/0", "prompt": "def inc(x):\n", "entry_point": "inc",
               "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    samples = [{"task_id": "t/0", "completion": f"    return x + {i % 2 == 0:d}  # {i}\n"} for i in range(6)]
    report = evaluate(samples, {"t/0": problem}, k=[1], servers=[live.url], workers=6, output=tmp_path / "r.jsonl")
    assert [r["status"] for r in report.results] == ["passed", "failed"] * 3
    assert live.app.state.batch_gate.granted == 6  # every sample went through /grade/batch
