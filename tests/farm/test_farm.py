"""The farm through its one URL, under docker-compose and on a one-node Swarm (the same files).

Each test runs against both (`farm` is parametrised by module); the last one kills a replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from farm_helpers import REPO, Farm, docker
from websockets.asyncio.client import connect

from sandbox_env import SandboxEnv
from sandbox_env.errors import ConnectionLostError, SandboxEnvError

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Our protocol tests and OpenEnv's clients and validator, run unchanged against the gateway
# (tests/conftest.py: `live_server` is the URL in SANDBOX_ENV_TEST_URL).
SUITE = [
    "tests/compat/test_openenv_compat.py",
    "tests/server/test_server_http.py::test_openenv_validate_passes",
    "tests/server/test_server_http.py::test_mcp_sessions",  # each call may reach either replica
    "tests/server/test_server_ws.py::test_reset_step_state_frames",
    "tests/server/test_server_ws.py::test_error_and_metadata_in_action",
    "tests/server/test_server_ws.py::test_step_without_reset_and_reset_clears",
    "tests/server/test_server_ws.py::test_sessions_are_isolated",
    "tests/server/test_server_ws.py::test_bad_messages_get_error_frames_and_session_survives",
    "tests/server/test_server_ws.py::test_binary_frame_is_read_as_utf8_json",
    "tests/server/test_web.py::test_inspection_api_lists_variables_history_and_closes",
    "tests/server/test_web.py::test_episode_page_renders_in_chromium_without_injecting_output",
]
SESSIONS = 200
REPLY_TIMEOUT_S = 600.0  # 200 containers start at once on two shared cores


def replica_of(episode_id: str) -> str:
    return episode_id.split(".", 1)[0]


@pytest.mark.timeout(900)
def test_the_protocol_suites_pass_through_the_gateway(farm: Farm) -> None:
    env = {**os.environ, "SANDBOX_ENV_TEST_URL": farm.url, "SANDBOX_ENV_TOKEN": farm.token, "SANDBOX_ENV_BACKEND": "docker",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "-rs", *SUITE], cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, tail
    assert "skipped" not in tail and " passed" in tail, tail


CHECK = """
import json, os
names = sorted(k for k in globals() if k.startswith('secret_'))
files = sorted(os.listdir('/workspace')) + sorted(f for f in os.listdir('/tmp') if f.startswith('mark_'))
sleeps = []
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')
    except OSError:
        continue
    if argv and argv[0].endswith(b'sleep'):
        sleeps.append(argv[1].decode())
print(json.dumps({"names": names, "files": files, "sleeps": sorted(sleeps),
                  "socket": os.path.exists('/var/run/docker.sock')}))
"""


async def _episode(farm: Farm, i: int) -> tuple[str, dict[str, Any]]:
    """One /ws episode through the gateway: leave a variable, files and a process, then look for
    everyone else's."""
    url = farm.url.replace("http://", "ws://", 1) + "/ws"
    async with connect(url, additional_headers=farm.headers, open_timeout=120, max_size=None) as ws:
        async def request(frame: dict[str, Any]) -> dict[str, Any]:
            await ws.send(json.dumps(frame))
            reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S))
            assert reply["type"] in ("observation", "state"), reply
            return reply["data"]

        reset = await request({"type": "reset", "data": {}})
        episode_id = reset["observation"]["metadata"]["episode_id"]
        leave = (f"import subprocess\nsecret_{i} = {i}\nopen('/workspace/mark_{i}', 'w').write('x')\n"
                 f"open('/tmp/mark_{i}', 'w').write('x')\nkeep = subprocess.Popen(['sleep', '{100000 + i}'])")
        left = await request({"type": "step", "data": {"code": leave}})
        assert left["observation"]["exit_code"] == 0, left
        seen = await request({"type": "step", "data": {"code": CHECK}})
        await ws.send(json.dumps({"type": "close"}))
    return episode_id, json.loads(seen["observation"]["stdout"])


@pytest.mark.timeout(900)
async def test_200_concurrent_episodes_complete_isolated_and_spread(farm: Farm) -> None:
    results = await asyncio.gather(*(_episode(farm, i) for i in range(SESSIONS)))
    assert len(results) == SESSIONS
    for i, (_, seen) in enumerate(results):
        assert seen == {"names": [f"secret_{i}"], "files": [f"mark_{i}", f"mark_{i}"],
                        "sleeps": [str(100000 + i)], "socket": False}, (i, seen)
    per_replica = Counter(replica_of(episode_id) for episode_id, _ in results)
    replicas = {line["replica"] for line in farm.replicas()}
    assert set(per_replica) == replicas and len(replicas) == 2, per_replica  # every replica served some


async def first_event(http: httpx.AsyncClient, episode_id: str) -> list[str]:
    """The first event of the episode's stream. A stream the client closed holds its slot until
    the server next writes (a second at most): a 429 for the tenant's limit is waited out."""
    deadline = time.monotonic() + 60
    while True:
        async with http.stream("GET", f"/episodes/{episode_id}/events") as events:
            if events.status_code == 429 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                continue
            assert events.status_code == 200, await events.aread()
            lines = events.aiter_lines()
            return [await anext(lines) for _ in range(2)]


async def test_an_episode_is_inspected_and_closed_through_any_replica(farm: Farm) -> None:
    envs: list[SandboxEnv] = []
    owners: dict[str, str] = {}  # replica -> episode_id
    try:
        while len(owners) < 2 and len(envs) < 12:  # least connections alternates; bounded anyway
            env = SandboxEnv(farm.url, token=farm.token)
            envs.append(env)
            await env.reset()
            episode_id = (await env.state()).episode_id
            await env.step(f"owner_replica = {replica_of(episode_id)!r}")
            owners.setdefault(replica_of(episode_id), episode_id)
        assert len(owners) == 2, owners
        async with httpx.AsyncClient(base_url=farm.url, headers=farm.headers, trust_env=False, timeout=30) as http:
            for replica, episode_id in owners.items():
                for _ in range(4):  # whichever replica the gateway picks answers for the owner
                    detail = await http.get(f"/episodes/{episode_id}")
                    assert detail.status_code == 200, detail.text
                    variables = {v["name"]: v["repr"] for v in detail.json()["kernel"]["variables"]}
                    assert variables["owner_replica"] == repr(replica)
                page = await http.get(f"/web/episodes/{episode_id}")
                assert page.status_code == 200 and episode_id in page.text
                for _ in range(4):  # the live page's event stream, relayed from the owner
                    first = await first_event(http, episode_id)
                    assert first[0] == "event: state" and repr(replica) in first[1], first
                for _ in range(4):  # the export too, from whichever replica
                    notebook = await http.get(f"/episodes/{episode_id}/notebook")
                    assert notebook.status_code == 200 and "owner_replica" in notebook.text, notebook.text[:300]
                    assert notebook.headers["content-disposition"].startswith("attachment")
            listing = (await http.get("/episodes")).json()
            assert {line["replica"] for line in listing["replicas"]} == set(owners)
            listed = {e["episode_id"]: e["replica"] for e in listing["episodes"]}
            assert all(listed[episode_id] == replica for replica, episode_id in owners.items())
            metrics = (await http.get("/metrics", params={"scope": "farm"})).text
            for replica in owners:
                assert f'sandbox_env_capacity{{replica="{replica}"}}' in metrics
            victim = sorted(owners.values())[0]
            assert (await http.delete(f"/episodes/{victim}")).status_code == 200
            assert (await http.get(f"/episodes/{victim}")).status_code == 404
            for _ in range(4):  # ended, its record stays exportable through any replica
                assert (await http.get(f"/episodes/{victim}/trace")).status_code == 200
    finally:
        for env in envs:
            await env.close()


async def test_the_web_page_shows_each_replicas_load_and_capacity(farm: Farm, chromium: str) -> None:
    async with SandboxEnv(farm.url, token=farm.token) as env:
        await env.reset()
        await env.step("shown = 1")
        episode_id = (await env.state()).episode_id
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # a helper may outlive chromium
            out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                  "--disable-background-networking", f"--user-data-dir={profile}",
                                  "--virtual-time-budget=5000", "--dump-dom", f"{farm.url}/web?token={farm.token}"],
                                 capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert '<table id="replicas">' in dom and "2 replicas" in dom
    for line in farm.replicas():
        assert f"<td>{line['replica']}</td>" in dom
    assert episode_id in dom


def test_farm_status_prints_every_replica(farm: Farm) -> None:
    proc = subprocess.run([sys.executable, "-m", "sandbox_env.cli", "farm", "status", farm.url, "--json"],
                          env={**os.environ, "SANDBOX_ENV_TOKEN": farm.token, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert len(status["replicas"]) == 2 and all(r["status"] == "ready" for r in status["replicas"])
    assert status["capacity"] == sum(r["capacity"] for r in status["replicas"])


def test_prometheus_scrapes_every_replica_by_dns(farm: Farm) -> None:
    """compose.monitoring.yaml: every replica's series, told apart by their replica label."""
    expected = {line["replica"] for line in farm.replicas()}
    deadline, found = time.monotonic() + 120, set()
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(farm.prometheus_url + "/api/v1/query", params={"query": "sandbox_env_capacity"},
                              timeout=10, trust_env=False).json()
            found = {series["metric"].get("replica") for series in reply["data"]["result"]}
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if found == expected:
            break
        time.sleep(1)
    assert found == expected


async def _sessions_on_both_replicas(farm: Farm) -> tuple[list[SandboxEnv], dict[str, SandboxEnv]]:
    """Sessions opened through the gateway until each replica holds one: (all opened, replica -> one)."""
    envs: list[SandboxEnv] = []
    on: dict[str, SandboxEnv] = {}
    while len(on) < 2 and len(envs) < 12:
        env = SandboxEnv(farm.url, token=farm.token)
        envs.append(env)
        await env.reset()
        on.setdefault(replica_of((await env.state()).episode_id), env)
    assert len(on) == 2, list(on)
    return envs, on


async def _open_retrying(farm: Farm) -> SandboxEnv:
    """A new session as a client should open one: a retryable refusal (a replica draining, not
    yet out of the gateway's rotation) is tried again, a bounded number of times."""
    for _ in range(20):
        env = SandboxEnv(farm.url, token=farm.token)
        try:
            await env.reset()
            return env
        except SandboxEnvError as exc:
            await env.close()
            if not exc.retryable:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("no session opened in 20 attempts")


def test_a_replica_reaches_nothing_outside_the_farm(farm: Farm) -> None:
    """The replicas hold the node's docker socket: their only network is the farm's, internal.
    From one, the gateway answers on the farm network, and nothing answers on the edge network
    (the gateway's, where its port is published, which this farm created). (Before the tests that
    stop a replica.)"""
    replica = farm.server_containers()[0]
    networks = json.loads(docker("network", "ls", "--format", "{{json .Name}}", "--filter", f"name={farm.name}_edge")
                          .splitlines()[0])
    edge = json.loads(docker("network", "inspect", networks, "--format", "{{json .IPAM.Config}}"))
    edge_gateway = next(entry["Gateway"] for entry in edge if entry.get("Gateway"))
    probe = ("import socket, sys\n"
             "def reach(host, port):\n"
             "    try:\n"
             "        socket.create_connection((host, port), timeout=3).close(); return 'open'\n"
             "    except OSError as exc:\n"
             "        return type(exc).__name__\n"
             f"print(reach('server', 8000), reach({edge_gateway!r}, {int(farm.url.rsplit(':', 1)[1])}))")
    seen = docker("exec", replica, "/usr/bin/python3", "-c", probe).split()
    assert seen[0] == "open", seen  # the farm network works: the replicas reach each other
    assert seen[1] != "open", f"a replica reached the edge network's gateway: {seen}"


def test_a_client_cannot_pass_for_a_replica(farm: Farm) -> None:
    """Replicas mark the requests they send each other; the gateway drops the mark from clients
    (with it, a replica would answer for itself alone)."""
    expected = {line["replica"] for line in farm.replicas()}
    for _ in range(4):
        listed = httpx.get(farm.url + "/episodes", headers={**farm.headers, "x-sandbox-env-farm": "someone"},
                           timeout=30, trust_env=False).json()
        assert {line["replica"] for line in listed["replicas"]} == expected

async def test_a_draining_replica_finishes_its_steps_and_leaves_the_rotation(farm: Farm) -> None:
    """SIGTERM (what `docker-compose down`, `stack rm` and a rolling update send): the replica's
    step in flight finishes, its sessions then end retryably, new sessions go to the other one."""
    envs, on = await _sessions_on_both_replicas(farm)
    victim, survivor = sorted(on)
    containers = {cid[:12]: cid for cid in farm.server_containers()}
    try:
        in_flight = asyncio.ensure_future(on[victim].step("import time; time.sleep(6); print('finished')"))
        await asyncio.sleep(1)
        docker("kill", "--signal", "TERM", victim)
        assert (await in_flight).observation.stdout == "finished\n"
        with pytest.raises(ConnectionLostError) as lost:
            await on[victim].step("print(1)")
        assert lost.value.retryable
        assert (await on[survivor].step("print('still here')")).observation.stdout == "still here\n"
        for _ in range(6):
            fresh = await _open_retrying(farm)
            envs.append(fresh)
            assert replica_of((await fresh.state()).episode_id) != victim
    finally:
        for env in envs:
            await env.close()
        if farm.kind == "compose":  # a stopped container stays stopped: start it again for the next test
            docker("wait", containers[victim], check=False, timeout=90)  # once the drain is over
            docker("start", containers[victim], check=False)


async def test_killing_a_replica_fails_only_its_sessions_and_new_ones_go_elsewhere(farm: Farm) -> None:
    """Runs last for its farm: one replica is gone after it."""
    envs: list[SandboxEnv] = []
    owners: list[str] = []
    try:
        while len(envs) < 8 or len(set(owners)) < 2:  # least connections alternates; bounded anyway
            assert len(envs) < 16, owners
            env = SandboxEnv(farm.url, token=farm.token)
            envs.append(env)
            await env.reset()
            await env.step(f"x = {len(envs) - 1}")
            owners.append(replica_of((await env.state()).episode_id))
        victim = owners[0]
        docker("kill", victim)  # the replica's name is its container's host name: its short id
        for i, (env, owner) in enumerate(zip(envs, owners)):
            if owner == victim:
                with pytest.raises(ConnectionLostError) as lost:
                    await env.step("print(x)")
                assert lost.value.retryable
            else:
                assert (await env.step("print(x)")).observation.stdout == f"{i}\n"
        for _ in range(8):  # new sessions: served, never by the dead replica
            async with SandboxEnv(farm.url, token=farm.token) as fresh:
                await fresh.reset()
                assert (await fresh.step("print('alive')")).observation.stdout == "alive\n"
                assert replica_of((await fresh.state()).episode_id) != victim
    finally:
        for env in envs:
            await env.close()

