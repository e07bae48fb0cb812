"""End to end: a real `sandbox-env serve` (uvicorn on loopback, its own process with a secret in
its environment, a task file with hidden tests), driven over `/ws` and `POST /grade` only.

While a canary session holds a secret and a grading holds hidden tests, an attacker session runs
the class sweep (every fd/mem/environ/cwd/root/netns of every process in view, every file and
socket of the shared directories, the server's port directly, by setns() into every network
namespace, and over HTTP), hijacks every kernel connection file of the server it can, and plants
markers in every shared directory it can write. Then a fresh session (the warm pool's kernel)
and the canary must show no trace of it, and the held grading must come back right.

The server runs in a subprocess, not a thread as in tests/server: `/proc/<server>/environ` holds
the environment a process was started with, so only a server started with the secret holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import pytest_asyncio
from security_helpers import (
    BACKENDS,
    GOOD_SQUARE,
    INFECTION,
    MACHINERY,
    RUNTIME_SOCKETS,
    Roles,
    connection_files_below,
    describe,
    holding_task,
    parse_report,
    probe_code,
    remove_markers,
    require_backend,
    reversed_needles,
    sweep_findings,
    token,
    wait_for_comm,
)
from websockets.asyncio.client import ClientConnection, connect

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]
HOLD_S = 30.0  # the grading held during the attack; it then finishes and must be right
REPLY_S = 120.0


@dataclass
class Server:
    url: str
    port: int
    pid: int
    secret: str
    backend: str
    token: str  # the API token (servers that require one read it from SANDBOX_ENV_TOKEN)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def serve(backend: str, workdir: Path, tasks: list[dict[str, Any]]) -> Iterator[Server]:
    """`sandbox-env serve` in a subprocess on a loopback port, with a secret in its environment."""
    (workdir / "tasks.json").write_text(json.dumps(tasks))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret, api_token = token("serversecret"), token("apitoken")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_ENV_")}
    env.update({"SANDBOX_ENV_TOKEN": api_token, "SANDBOX_ENV_BACKEND": backend, "SANDBOX_ENV_POOL_SIZE": "1", "SANDBOX_ENV_GRADER_STASH": "1",
                "SANDBOX_ENV_MAX_SESSIONS": "8", "SANDBOX_ENV_TASKS": str(workdir / "tasks.json"),
                "SBX_SERVER_SECRET": secret})
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-c", "from sandbox_env.cli import app\napp()", "serve",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start: {(workdir / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield Server(f"http://127.0.0.1:{port}", port, proc.pid, secret, backend, api_token)
    finally:
        stop(proc)
        log.close()
        for left in Path(tempfile.gettempdir()).glob(f"sandbox-env-{proc.pid}-*"):  # only if it was killed
            shutil.rmtree(left, ignore_errors=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server this test started (by its pid): SIGTERM, then again (uvicorn's forced exit),
    then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)


class Session:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        await self.ws.send(json.dumps(frame))
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), REPLY_S))
        return reply

    async def reset(self) -> None:
        reply = await self.request({"type": "reset", "data": {}})
        assert reply["type"] == "observation", reply

    async def step(self, code: str, timeout_s: float = 60) -> dict[str, Any]:
        reply = await self.request({"type": "step", "data": {"code": code}, "timeout_s": timeout_s})
        assert reply["type"] == "observation", reply
        observation: dict[str, Any] = reply["data"]["observation"]
        return observation

    async def probe(self, function: str, args: dict[str, Any]) -> dict[str, Any]:
        observation = await self.step(probe_code(function, args))
        report = parse_report(observation["stdout"])
        assert report is not None, f"the probe {function} reported nothing: {observation['stderr'][-3000:]}"
        return report


@contextlib.asynccontextmanager
async def session(server: Server) -> AsyncIterator[Session]:
    url = server.url.replace("http://", "ws://") + "/ws"
    async with connect(url, max_size=None, open_timeout=30, close_timeout=5,
                       additional_headers=server.headers) as ws:
        client = Session(ws)
        await client.reset()
        yield client


@dataclass
class Attack:
    backend: str
    roles: Roles
    findings: dict[str, list[str]]
    fresh: dict[str, Any]
    canary_after: list[Any]
    grading: dict[str, Any]
    hijacked: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=BACKENDS)
async def attack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Attack]:
    backend = str(request.param)
    require_backend(backend, request)
    marker, comm = token("hidden"), "sbxg" + token("")[3:13]
    workdir = tmp_path_factory.mktemp(f"server-{backend}")
    infection, plant_name = token("infect"), token("marker")
    planted: list[str] = []
    with serve(backend, workdir, [holding_task(marker, comm, HOLD_S)]) as server:
        grader_pid = None
        try:
            async with session(server) as canary, httpx.AsyncClient(base_url=server.url, timeout=HOLD_S + 120,
                                                                      headers=server.headers) as http:
                secret, file_name = token("canary"), token("file")
                await canary.step(f"CANARY = {secret!r}\nopen({file_name!r}, 'w').write(CANARY)")
                grading = asyncio.create_task(http.post("/grade", json={"task_id": "security/hold",
                                                                        "submission": GOOD_SQUARE}))
                grader_pid = await asyncio.to_thread(wait_for_comm, comm, 60.0)
                assert grader_pid is not None, f"harness: the grader never started ({grading})"
                async with session(server) as attacker:
                    needles = {"server:secret": server.secret, "server:token": server.token,
                               "canary:secret": secret, "canary:file": file_name,
                               "grader:hidden": marker}
                    report = await attacker.probe("sweep", {
                        "needles": reversed_needles(needles), "ports": [server.port], "http_ports": [server.port],
                        "socket_paths": RUNTIME_SOCKETS, "skip": MACHINERY})
                    assert not grading.done(), "harness: the grading ended before the sweep did"
                    roles = Roles(server={server.pid}, comms={"grader": comm})
                    roles.adopt(report)
                    findings = sweep_findings(report, roles)
                    targets = connection_files_below(server.pid)
                    hijacked = await attacker.probe("hijack", {
                        "paths": targets, "payload": INFECTION.format(token=infection), "timeout_s": 5}) if targets else {}
                    planted = (await attacker.probe("plant", {"name": plant_name, "token": infection}))["planted"]
                async with session(server) as fresh:  # the warm pool's kernel, for an unrelated client
                    seen = await fresh.probe("infected", {"name": plant_name})
                after = await canary.step("import builtins, json\nprint(json.dumps([getattr(builtins, 'sbx_infected', None),"
                                          " globals().get('sbx_infected'), CANARY]))")
                canary_after = json.loads(after["stdout"].strip().splitlines()[-1])
                reply = await grading
                yield Attack(backend, roles, findings, seen, canary_after,
                             reply.json() if reply.status_code == 200 else {"http": reply.status_code, "body": reply.text},
                             hijacked, report)
        finally:
            remove_markers(planted, plant_name)
            if grader_pid is not None:  # a held grader outliving a killed server: ours, by its pid
                with contextlib.suppress(psutil.Error):
                    if psutil.Process(grader_pid).name() == comm:
                        psutil.Process(grader_pid).kill()


async def test_the_attack_ran(attack: Attack) -> None:
    """The attacker saw itself as `own` on the host, walked files, and (jupyter) really tried the
    connection files of the server's other kernels: otherwise the other tests prove nothing."""
    assert attack.roles.own_cgroup, f"the attacker was not found on the host: {attack.report['self']}"
    assert attack.report["files"]["entries"] > 0 and "harness" not in attack.findings, attack.report["files"]
    if attack.backend == "jupyter":
        foreign = [p for p, r in attack.hijacked.items() if not r.get("own")]
        assert foreign, f"no foreign kernel connection file was attacked: {attack.hijacked}"


async def test_no_access_to_other_episodes(attack: Attack) -> None:
    roles = ("canary", "other-sandbox")
    assert not any(attack.findings.get(r) for r in roles), (
        "through the server, an episode reached other episodes:\n" + describe(attack.findings, roles))


async def test_no_access_to_the_grader(attack: Attack) -> None:
    assert not attack.findings.get("grader"), (
        "through the server, an episode reached a grading in progress:\n" + describe(attack.findings, ("grader",)))


async def test_no_access_to_the_server(attack: Attack) -> None:
    """The server's process (its environment's secret included), its API port (directly, by
    setns() into its network namespace, over HTTP), the container runtime's socket."""
    assert not attack.findings.get("server"), (
        "an episode reached the server:\n" + describe(attack.findings, ("server",)))


async def test_no_access_to_the_host(attack: Attack) -> None:
    roles = ("host", "gone")
    assert not any(attack.findings.get(r) for r in roles), (
        "an episode reached the host:\n" + describe(attack.findings, roles))


async def test_no_infection_of_the_warm_pool_or_a_live_episode(attack: Attack) -> None:
    infected = {k: v for k, v in attack.fresh.items() if v}
    assert not infected and attack.canary_after[:2] == [None, None], (
        f"fresh episode: {infected}; live canary episode: {attack.canary_after}; "
        f"kernel channels hijacked: {attack.hijacked}")


async def test_the_held_grading_was_graded_right(attack: Attack) -> None:
    """The grading that ran during the attack still gave the right reward (a control: the held
    grader really ran the hidden tests)."""
    assert attack.grading.get("reward") == 1.0, attack.grading
