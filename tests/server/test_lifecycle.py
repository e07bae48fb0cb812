"""Graceful drain on SIGTERM and cleanup after SIGKILL (issue #9, item 5), on real `sandbox-env
serve` processes under load: several sessions stepping at once and gradings in flight.

The findings: on SIGTERM a step in flight was cut off with close code 1012 and no observation,
and `/readyz` never reported draining; a server killed with SIGKILL left its episode daemons,
cgroups and work directories until the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from served import DAEMON_MARK, ask, leftovers, serve, wait_for
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.slow
STEPS, GRADINGS = 6, 2  # in flight at the signal
# A grading that takes a few seconds: the submission sleeps in the call the check makes.
SLOW_TASK = {"id": "slow-square", "prompt": "def square(x):\n", "entry_point": "square",
             "tests": {"kind": "function", "entry_point": "square",
                       "check": "def check(candidate):\n    assert candidate(3) == 9\n"}}


def slow_square(right: bool) -> str:
    return f"import time\ndef square(x):\n    time.sleep(4)\n    return x * x{'' if right else ' + 1'}\n"


async def gradings_in_flight(http: httpx.AsyncClient) -> list[asyncio.Task[httpx.Response]]:
    """GRADINGS `POST /grade` of SLOW_TASK, alternately right and wrong, left running."""
    return [asyncio.create_task(http.post("/grade", json={"task": SLOW_TASK, "submission": slow_square(i % 2 == 0)},
                                          timeout=120))
            for i in range(GRADINGS)]


async def load_reached(http: httpx.AsyncClient, sessions: int) -> None:
    """Every session's step and every grading are running (gradings count as sessions)."""
    async def running() -> bool:
        episodes = (await http.get("/episodes")).json()["episodes"]
        active = (await http.get("/readyz")).json()["active_sessions"]
        return sum(e["busy"] for e in episodes) == sessions and active == sessions + GRADINGS
    await wait_for(running, f"{sessions} steps and {GRADINGS} gradings in flight", 120)


def step_code(i: int) -> str:
    """Even steps end by themselves; odd ones only at the policy's step limit (a timeout)."""
    return f"import time\ntime.sleep({6 if i % 2 == 0 else 600})\nprint('done', {i})"


@pytest.mark.parametrize("backend", ["jupyter", pytest.param("docker", marks=pytest.mark.docker)])
async def test_sigterm_lets_every_step_in_flight_finish_then_closes_with_1001(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """The drain figure: 100 % of the steps in flight at SIGTERM return an observation, the ones
    that run to the policy's step limit included (the grace is at least that limit), and every
    grading in flight returns its verdict."""
    if backend == "docker":
        request.getfixturevalue("require_docker")
    with serve(tmp_path, backend, pool_size=str(STEPS), max_sessions=str(STEPS + GRADINGS + 2)) as server:
        http = httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30)
        sessions = [await connect(server.ws, additional_headers=server.headers, open_timeout=30)
                    for _ in range(STEPS)]
        gradings: list[asyncio.Task[httpx.Response]] = []
        try:
            for ws in sessions:
                assert (await ask(ws, {"type": "reset"}))["type"] == "observation"
            for i, ws in enumerate(sessions):
                await ws.send(json.dumps({"type": "step", "data": {"code": step_code(i)}}))
            gradings = await gradings_in_flight(http)
            await load_reached(http, STEPS)
            server.process.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return (await http.get("/readyz")).status_code == 503
            await wait_for(draining, "/readyz reports draining")
            assert (await http.get("/readyz")).json()["status"] == "draining"
            refused = await http.post("/step", json={"action": {"code": "print(1)"}})
            assert refused.status_code == 503 and refused.json()["detail"]["code"] == "draining"
            async with connect(server.ws, additional_headers=server.headers, open_timeout=30) as late:
                frame = json.loads(await asyncio.wait_for(late.recv(), 30))
                assert frame["data"]["code"] == "CAPACITY_REACHED" and frame["data"]["error_code"] == "draining"

            for i, ws in enumerate(sessions):  # every step in flight comes back with its observation
                reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
                assert reply["type"] == "observation", reply
                observation = reply["data"]["observation"]
                if i % 2 == 0:
                    assert observation["stdout"] == f"done {i}\n", observation
                else:  # cut by its own limit, not by the shutdown
                    assert observation["metadata"]["execution"]["status"] == "timeout", observation
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 60)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
                assert closed.value.rcvd.reason == "server shutting down"
            for i, grading in enumerate(gradings):  # and every grading in flight, its verdict
                reply = await asyncio.wait_for(grading, 60)
                assert reply.status_code == 200, reply.text
                verdict = reply.json()
                assert verdict["status"] == "graded" and verdict["reward"] == (1.0 if i % 2 == 0 else 0.0), verdict
            await asyncio.to_thread(server.process.wait, 60)
        finally:
            for grading in gradings:
                grading.cancel()
            await asyncio.gather(*gradings, return_exceptions=True)
            await http.aclose()
            for ws in sessions:
                await ws.close()


DAEMON = (f"import subprocess, os\nsubprocess.Popen(['sleep', '{DAEMON_MARK}'], start_new_session=True, "
          "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nopen('left-behind.txt', 'w').write('x' * 1000)\n"
          "print(os.getcwd())")


@pytest.mark.parametrize("backend", ["jupyter", pytest.param("docker", marks=pytest.mark.docker)])
async def test_sigkill_of_the_server_leaves_nothing_behind(tmp_path: Path, backend: str,
                                                          request: pytest.FixtureRequest) -> None:
    """Each episode leaves a detached daemon and files; at SIGKILL every session has a step in
    flight and gradings run beside them: within seconds nothing of the server is left."""
    if backend == "docker":
        request.getfixturevalue("require_docker")
    with serve(tmp_path, backend, pool_size=str(STEPS), max_sessions=str(STEPS + GRADINGS + 2)) as server:
        pid = server.process.pid
        http = httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30)
        sessions = [await connect(server.ws, additional_headers=server.headers, open_timeout=30)
                    for _ in range(STEPS)]
        gradings: list[asyncio.Task[httpx.Response]] = []
        try:
            for ws in sessions:
                reply = await ask(ws, {"type": "step", "data": {"code": DAEMON}})
                assert reply["data"]["observation"]["exit_code"] == 0, reply
            for ws in sessions:
                await ws.send(json.dumps({"type": "step", "data": {"code": "import time; time.sleep(60)"}}))
            gradings = await gradings_in_flight(http)
            await load_reached(http, STEPS)
            assert leftovers(pid), "the episodes left nothing to clean up: the test proves nothing"
            server.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(server.process.wait, 30)
            deadline = time.monotonic() + 60
            while (left := await asyncio.to_thread(leftovers, pid)) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert left == [], f"left after SIGKILL of the server: {left}"
        finally:  # never leave junk, even when the assertion above fails
            for grading in gradings:
                grading.cancel()
            await asyncio.gather(*gradings, return_exceptions=True)
            await http.aclose()
            for ws in sessions:
                with contextlib.suppress(Exception):
                    await ws.close()
            clean_up_after(pid)


def clean_up_after(pid: int) -> None:
    from sandbox_env.server.reaper import sweep_jupyter

    sweep_jupyter(pid, None)
    for line in leftovers(pid):
        kind, _, rest = line.partition(" ")
        if kind == "process":
            with contextlib.suppress(OSError):
                os.kill(int(rest.split()[0]), signal.SIGKILL)
        elif kind == "container":
            subprocess.run(["docker", "rm", "-f", rest], capture_output=True, timeout=60)
