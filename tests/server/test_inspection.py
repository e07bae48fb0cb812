"""Inspection never disturbs an episode: no code of the episode runs because someone looked, and a
running step is answered at once. On a real server, for both backends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox_env import SandboxEnv

BACKENDS = ["jupyter", pytest.param("docker", marks=pytest.mark.docker)]

# Values whose methods would sleep, raise, or change the namespace if anyone called them: a snapshot
# lists them by type alone. `touched` counts calls; `_` is set by the last expression.
HOSTILE = '''
import random, time
touched = []
class Sleepy:
    def __repr__(self):
        time.sleep(30)
        return "slept"
class Raising:
    def __repr__(self):
        raise RuntimeError("repr ran")
    def __len__(self):
        raise RuntimeError("len ran")
class Mutating:
    def __repr__(self):
        touched.append("repr")
        globals()["planted"] = 1
        return "mutated"
    def __getattr__(self, name):
        touched.append("getattr " + name)
        return 0
    @property
    def __class__(self):
        touched.append("__class__")
        return int
    def __sizeof__(self):
        touched.append("sizeof")
        return 1
class Meta(type):
    def __hash__(cls):
        touched.append("hash")
        return 1
    def __eq__(cls, other):
        touched.append("eq")
        return False
    @property
    def __name__(cls):
        touched.append("name")
        return "Forged"
class Weird(metaclass=Meta):
    pass
class Listy(list):
    def __repr__(self):
        touched.append("list repr")
        return "listy"
sleepy, raising, mutating, weird, listy = Sleepy(), Raising(), Mutating(), Weird(), Listy([1])
nested = {"a": [sleepy, raising, (mutating, weird)], "b": {1, 2}, "text": "x" * 10_000}
big = 10 ** 5000
random.seed(7)
"last value"
'''
# What the episode can observe of itself: the namespace's names and identities, `_`, the RNG state,
# the calls counted above, and (Jupyter) the execution count, which this step itself moves by one.
OBSERVE = '''
import hashlib, random, sys
_seen = sorted((k, id(v)) for k, v in globals().items() if not k.startswith("_") and k != "In" and k != "Out")
_ip = sys.modules.get("IPython") and __import__("IPython").get_ipython()
print(hashlib.sha256(repr((_seen, _, random.getstate(), touched)).encode()).hexdigest())
print(_ip.execution_count if _ip else -1)
del _seen, _ip
'''


@pytest.fixture(params=BACKENDS)
def server(request: pytest.FixtureRequest, live_server_factory: Any) -> Iterator[Any]:
    if request.param == "docker":
        request.getfixturevalue("require_docker")
    yield live_server_factory(backend=request.param, pool_size=1)


async def test_inspection_runs_no_code_of_the_episode(server: Any) -> None:
    async with SandboxEnv(server.url) as env, httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        await env.reset(episode_id="hostile")
        made = await env.step(HOSTILE)
        assert made.observation.status.value == "ok", made.observation.stderr  # a repr that sleeps was never called
        first = (await env.step(OBSERVE)).observation.stdout.split()
        for _ in range(100):
            seen = (await http.get("/episodes/hostile")).json()
            assert seen["running"] is None and seen["snapshot_step"] == 2
        again = (await env.step(OBSERVE)).observation.stdout.split()
        assert again[0] == first[0], "the namespace, _, the RNG state or the call counter changed"
        if first[1] != "-1":  # Jupyter: only the step itself moved the count
            assert int(again[1]) == int(first[1]) + 1
        rows = {v["name"]: v for v in seen["kernel"]["variables"]}
        assert rows["sleepy"] == {"name": "sleepy", "type": "__main__.Sleepy", "repr": "<__main__.Sleepy>"}
        assert rows["mutating"]["repr"] == "<__main__.Mutating>" and rows["raising"]["type"] == "__main__.Raising"
        assert rows["weird"]["repr"] == "<__main__.Weird>" and "Forged" not in json.dumps(rows)
        assert rows["listy"]["repr"] == "<__main__.Listy>" and "len" not in rows["listy"]
        assert rows["nested"]["len"] == 3 and "<__main__.Sleepy>" in rows["nested"]["repr"]
        assert rows["big"]["repr"].startswith("<int of") and "touched" in rows and "random" not in rows
        assert (await env.step("print(touched, 'planted' in globals())")).observation.stdout == "[] False\n"


async def test_a_running_step_is_answered_at_once(server: Any) -> None:
    async with SandboxEnv(server.url) as env, httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        await env.reset(episode_id="sleeper")
        await env.step("before = list(range(5))")
        step = asyncio.create_task(env.step("import time\nprint('started', flush=True)\ntime.sleep(30)\nprint('late')"))
        while True:
            seen = (await http.get("/episodes/sleeper")).json()
            running = seen["running"]
            if running and "started" in running["output"]["stdout"]:
                break
            assert not step.done(), step.result()
            await asyncio.sleep(0.05)
        assert not step.done()  # the step is still sleeping: inspection did not wait for it
        assert running["step"] == 2 and "time.sleep(30)" in running["code"] and running["elapsed_s"] >= 0
        assert seen["snapshot_step"] == 1 and [v["name"] for v in seen["kernel"]["variables"]] == ["before"]
        assert seen["kernel"]["memory_mb"] and seen["kernel"]["memory_mb"] > 1
        assert seen["kernel"]["cpu_time_s"] is not None and seen["summary"]["busy"] is True
        assert (await http.delete("/episodes/sleeper")).status_code == 200  # ends the sleeping step
        ended = await asyncio.wait_for(step, 60)
        assert ended.observation.status.value == "killed" and "late" not in ended.observation.stdout


# Builtins and stdlib names an episode replaces with spies: each records a call made (at any depth)
# from the snapshot's functions (by their names) and draws from the RNG, as hostile code would.
PATCHES = '''
import builtins, itertools, random, sys, types
spied = []
SNAPSHOT_FUNCTIONS = {"take", "describe", "safe_repr", "_container", "type_name", "encoded", "_is_module"}
def _called(name):
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in SNAPSHOT_FUNCTIONS:
            spied.append(name)
            random.random()
            break
        frame = frame.f_back
    return False
def _spy(name, real):
    def spy(*args, **kwargs):
        _called(name)
        return real(*args, **kwargs)
    return spy
for _name in ("repr", "len", "issubclass", "iter", "id"):
    setattr(builtins, _name, _spy(_name, getattr(builtins, _name)))
itertools.islice = _spy("islice", itertools.islice)
class _Recording(type):
    def __subclasscheck__(cls, sub):
        return _called("ModuleType.__subclasscheck__")
    def __instancecheck__(cls, obj):
        return _called("ModuleType.__instancecheck__")
types.ModuleType = _Recording("ModuleType", (), {})
values = {"a": [1, 2.5, "x"], "b": (3,)}
number, text, listed = 1.5, "hello", [1, 2, 3]
random.seed(11)
rng_before = random.getstate()
'''


async def test_a_snapshot_calls_nothing_the_episode_patched(server: Any) -> None:
    async with SandboxEnv(server.url) as env:
        await env.reset(episode_id="patched")
        made = await env.step(PATCHES)
        assert made.observation.status.value == "ok", made.observation.stderr
        seen = await env.step("print(sorted(set(spied)), random.getstate() == rng_before)")
        assert seen.observation.stdout == "[] True\n", seen.observation.stdout + seen.observation.stderr


ALICE, BOB = "alice-token-" + "a" * 20, "bob-token-" + "b" * 22


async def _stream(http: httpx.AsyncClient, path: str, stack: contextlib.AsyncExitStack) -> httpx.Response:
    """Open `path`'s event stream and keep it open (on `stack`): a 200 after its first event, or
    a refusal, read whole."""
    reply = await stack.enter_async_context(http.stream("GET", path))
    if reply.status_code == 200:
        lines = reply.aiter_lines()
        stack.push_async_callback(lines.aclose)  # held: an iterator dropped (collected) would close the stream
        async for line in lines:
            if line.startswith("event: state"):
                break
    else:
        await reply.aread()
    return reply


def _too_many(reply: httpx.Response) -> bool:
    return reply.status_code == 429 and "too many open event streams" in reply.json()["detail"]["message"]


async def test_event_streams_are_capped_per_tenant_and_in_all(live_server_factory: Any) -> None:
    """One tenant's streams (each holds a connection for up to an hour) never take another's
    connections: alice's third stream and bob's second (the server's third) get 429."""
    server = live_server_factory(tenants={"alice": ALICE, "bob": BOB}, max_connections=10, pool_size=0,
                                 event_streams_per_tenant=2, max_event_streams=3)
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for name, token in (("alice", ALICE), ("bob", BOB)):
            env = await stack.enter_async_context(SandboxEnv(server.url, token=token))
            await env.reset(episode_id=f"{name}-ep")
            clients[name] = await stack.enter_async_context(
                httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60))
        alice, bob = clients["alice"], clients["bob"]
        first = contextlib.AsyncExitStack()
        assert (await _stream(alice, "/episodes/alice-ep/events", first)).status_code == 200
        assert (await _stream(alice, "/episodes/alice-ep/events", stack)).status_code == 200
        refused = await _stream(alice, "/episodes/alice-ep/events", stack)
        assert _too_many(refused) and "event_streams_per_tenant" in refused.text, refused.status_code
        assert (await _stream(bob, "/episodes/bob-ep/events", stack)).status_code == 200
        full = await _stream(bob, "/episodes/bob-ep/events", stack)  # bob has one: the server's cap
        assert _too_many(full) and "max_event_streams" in full.text, full.status_code
        for path in ("/health", "/episodes", "/episodes/bob-ep", "/web"):
            assert (await bob.get(path)).status_code == 200, path
        listing, shown = await bob.get("/episodes"), await bob.get("/episodes/bob-ep")
        assert listing.headers["x-content-type-options"] == shown.headers["x-content-type-options"] == "nosniff"
        await first.aclose()  # a closed stream frees its slot
        deadline = asyncio.get_running_loop().time() + 30
        while _too_many(again := await _stream(alice, "/episodes/alice-ep/events", stack)):
            assert asyncio.get_running_loop().time() < deadline, "the closed stream's slot was never freed"
            await asyncio.sleep(0.1)
        assert again.status_code == 200
