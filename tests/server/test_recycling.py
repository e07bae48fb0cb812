"""Recycling through a real `sandbox-env serve --backend docker` (issue #13), on loopback, with the
shipped default policy (which recycles): OpenEnv's stateless HTTP `/step` and `/ws` resets take
recycled sandboxes, none of them shows the last episode's state, `/metrics` counts kernels handed
out fresh and recycled and the sandboxes refused, and a stop leaves no container behind."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from served import ask, leftovers, serve, wait_for
from websockets.asyncio.client import connect

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Prints what a previous episode in the same sandbox would have left, then leaves a variable.
PROBE = ("import os\nprint(globals().get('mark'), os.listdir('/workspace'), os.listdir('/tmp'))\nmark = {i}")
NOTHING = "None [] []\n"


def counter(metrics: str, family: str, **labels: str) -> float:
    """One sample of a Prometheus counter family, 0 when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in metrics.splitlines():
        if line.startswith(f"{family}_total{{") and line.split("{", 1)[1].split("}", 1)[0] == wanted:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_stateless_steps_take_recycled_sandboxes_and_see_nothing_of_the_last(
        tmp_path: Path, require_docker: None) -> None:
    with serve(tmp_path, "docker", pool_size="1") as server:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
            for i in range(6):
                reply = await http.post("/step", json={"action": {"code": PROBE.format(i=i)}})
                assert reply.status_code == 200 and reply.json()["observation"]["stdout"] == NOTHING, reply.text
            metrics = (await http.get("/metrics")).text
            recycled = counter(metrics, "sandbox_env_kernels_handed_out", policy="default", source="recycled")
            assert recycled >= 1, metrics  # a control: the probes did run in recycled sandboxes
            assert counter(metrics, "sandbox_env_kernels_handed_out", policy="default", source="fresh") >= 1

            left = await http.post("/step", json={"action": {"code": "open('/tmp/left', 'w').write('x')"}})
            assert left.status_code == 200, left.text

            async def refused() -> bool:
                text = (await http.get("/metrics")).text
                return counter(text, "sandbox_env_recycle_refusals", policy="default", reason="leftovers") == 1
            await wait_for(refused, "the sandbox that kept a file is refused, and counted")
            after = await http.post("/step", json={"action": {"code": PROBE.format(i=9)}})
            assert after.json()["observation"]["stdout"] == NOTHING, after.text
        pid = server.process.pid
    assert leftovers(pid) == [], "a stopped server left containers (recycled ones are the pool's)"


async def test_ws_resets_take_recycled_sandboxes_with_a_fresh_namespace(tmp_path: Path, require_docker: None) -> None:
    with serve(tmp_path, "docker", pool_size="1") as server:
        async with connect(server.ws, additional_headers=server.headers, open_timeout=30) as ws:
            for i in range(4):
                assert (await ask(ws, {"type": "reset"}))["type"] == "observation"
                reply = await ask(ws, {"type": "step", "data": {"code": PROBE.format(i=i)}})
                assert reply["data"]["observation"]["stdout"] == NOTHING, reply
            await ws.send(json.dumps({"type": "close"}))
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
            metrics = (await http.get("/metrics")).text
        assert counter(metrics, "sandbox_env_kernels_handed_out", policy="default", source="recycled") >= 1, metrics
        pid = server.process.pid
    assert leftovers(pid) == []
