"""Graceful drain on SIGTERM and cleanup after SIGKILL (issue #9, item 5), on real `sandbox-env
serve` processes.

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
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.slow
DAEMON_MARK = "86123"  # `sleep 86123`: a daemon an episode leaves behind, easy to find in /proc


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {os.environ['SANDBOX_ENV_TOKEN']}"}

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"


@contextlib.contextmanager
def serve(tmp_path: Path, backend: str, **settings: str) -> Iterator[Served]:
    """`sandbox-env serve` in a subprocess (the token comes from SANDBOX_ENV_TOKEN)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "SANDBOX_ENV_BACKEND": backend,
           **{f"SANDBOX_ENV_{k.upper()}": v for k, v in settings.items()}}
    log = tmp_path / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "sandbox_env.cli", "serve", "--port", str(port)],
                                   cwd=tmp_path, env=env, stdout=sink, stderr=sink)
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{served.url}/health", timeout=2).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGINT)  # the second one skips the drain
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def ask(ws, frame: dict) -> dict:
    await ws.send(json.dumps(frame))
    return json.loads(await asyncio.wait_for(ws.recv(), 120))


async def wait_for(predicate, what: str, bound_s: float = 60.0) -> None:
    deadline = time.monotonic() + bound_s
    while not await predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


async def test_sigterm_lets_every_step_in_flight_finish_then_closes_with_1001(tmp_path: Path) -> None:
    with serve(tmp_path, "jupyter", pool_size="4", max_sessions="8") as server:
        http = httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30)
        sessions = [await connect(server.ws, additional_headers=server.headers, open_timeout=30) for _ in range(4)]
        try:
            for ws in sessions:
                assert (await ask(ws, {"type": "reset"}))["type"] == "observation"
            for i, ws in enumerate(sessions):
                await ws.send(json.dumps({"type": "step", "data": {
                    "code": f"import time\ntime.sleep(6)\nprint('done', {i})"}}))

            async def all_busy() -> bool:
                return sum(e["busy"] for e in (await http.get("/episodes")).json()["episodes"]) == 4
            await wait_for(all_busy, "four steps in flight")
            server.process.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return (await http.get("/readyz")).status_code == 503
            await wait_for(draining, "/readyz reports draining")
            assert (await http.get("/readyz")).json()["status"] == "not ready"
            refused = await http.post("/step", json={"action": {"code": "print(1)"}})
            assert refused.status_code == 503 and refused.json()["detail"]["code"] == "draining"
            async with connect(server.ws, additional_headers=server.headers, open_timeout=30) as late:
                frame = json.loads(await asyncio.wait_for(late.recv(), 30))
                assert frame["data"]["code"] == "CAPACITY_REACHED" and frame["data"]["error_code"] == "draining"

            for i, ws in enumerate(sessions):  # every step in flight comes back with its observation
                reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
                assert reply["type"] == "observation", reply
                assert reply["data"]["observation"]["stdout"] == f"done {i}\n"
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 60)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
                assert closed.value.rcvd.reason == "server shutting down"
            await asyncio.to_thread(server.process.wait, 60)
        finally:
            await http.aclose()
            for ws in sessions:
                await ws.close()


def leftovers(pid: int) -> list[str]:
    """Everything that still names the server `pid`: containers, cgroups, work dirs, daemons."""
    found: list[str] = []
    try:
        import docker

        client = docker.from_env(timeout=30)
        for container in client.api.containers(all=True, filters={"label": "sandbox-env.server"}):
            if str(container["Labels"].get("sandbox-env.server", "")).startswith(f"{pid}:"):
                found.append(f"container {container['Id'][:12]}")
    except Exception:  # noqa: BLE001 - no engine here: nothing of ours can run in one
        pass
    from sandbox_env.kernels.limits import cgroup_layout

    for parent in cgroup_layout()[1].values():
        found += [f"cgroup {d}" for d in (parent.glob(f"{pid}-*") if parent.is_dir() else [])]
    found += [f"workdir {d}" for d in Path(tempfile.gettempdir()).glob(f"sandbox-env-{pid}-*")]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if cmdline[:2] == [b"sleep", DAEMON_MARK.encode()]:
                    found.append(f"process {entry} (sleep {DAEMON_MARK})")
    return found


DAEMON = (f"import subprocess, os\nsubprocess.Popen(['sleep', '{DAEMON_MARK}'], start_new_session=True, "
          "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nopen('left-behind.txt', 'w').write('x' * 1000)\n"
          "print(os.getcwd())")


@pytest.mark.parametrize("backend", ["jupyter", pytest.param("docker", marks=pytest.mark.docker)])
async def test_sigkill_of_the_server_leaves_nothing_behind(tmp_path: Path, backend: str,
                                                          request: pytest.FixtureRequest) -> None:
    if backend == "docker":
        request.getfixturevalue("require_docker")
    with serve(tmp_path, backend, pool_size="2", max_sessions="4") as server:
        pid = server.process.pid
        try:
            async with connect(server.ws, additional_headers=server.headers, open_timeout=30) as a, \
                    connect(server.ws, additional_headers=server.headers, open_timeout=30) as b:
                for ws in (a, b):
                    reply = await ask(ws, {"type": "step", "data": {"code": DAEMON}})
                    assert reply["data"]["observation"]["exit_code"] == 0, reply
                await a.send(json.dumps({"type": "step", "data": {"code": "import time; time.sleep(60)"}}))
                assert leftovers(pid), "the episodes left nothing to clean up: the test proves nothing"
                server.process.send_signal(signal.SIGKILL)
                await asyncio.to_thread(server.process.wait, 30)
            deadline = time.monotonic() + 60
            while (left := await asyncio.to_thread(leftovers, pid)) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert left == [], f"left after SIGKILL of the server: {left}"
        finally:  # never leave junk, even when the assertion above fails
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
