"""`SyncSandboxEnv`: the blocking twin, against a real server."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from sandbox_env import ClientError, SandboxEnv, SyncSandboxEnv
from sandbox_env.models import EpisodeState


def test_sync_client_keeps_state_across_steps(live_server) -> None:
    with SandboxEnv(live_server.url).sync() as env:
        assert isinstance(env, SyncSandboxEnv)
        env.reset()
        env.step("total = sum(range(10))")
        result = env.step({"code": "print(total)"})
        state = env.state()
    assert result.observation.stdout == "45\n"
    assert isinstance(state, EpisodeState) and state.step_count == 2


def test_sync_client_works_inside_a_running_event_loop(live_server) -> None:
    # Jupyter and TRL callbacks call sync APIs while a loop is running in this thread.
    async def inside_loop() -> str:
        with SandboxEnv(live_server.url).sync() as env:
            env.reset()
            return env.step("print('from a loop')").observation.stdout

    assert asyncio.run(inside_loop()) == "from a loop\n"


def test_sync_clients_in_threads_are_independent(live_server) -> None:
    outputs: dict[int, str] = {}

    def worker(i: int) -> None:
        with SandboxEnv(live_server.url).sync() as env:
            env.reset()
            env.step(f"mine = {i}")
            outputs[i] = env.step("print(mine)").observation.stdout

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outputs == {i: f"{i}\n" for i in range(3)}


def test_extra_coroutine_methods_are_wrapped_and_close_is_final(live_server) -> None:
    env = SandboxEnv(live_server.url).sync()
    assert env.health()["status"] == "healthy"
    env.reset()
    env.close()
    env.close()  # harmless
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


def test_a_failed_connect_in_with_stops_the_wrapper() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env = SandboxEnv(f"http://127.0.0.1:{sock.getsockname()[1]}", connect_retries=0).sync()
        with pytest.raises(ClientError), env:
            pass
    with pytest.raises(RuntimeError, match="closed"):
        env.state()


def test_a_client_never_closed_does_not_hold_up_interpreter_exit(live_server) -> None:
    """Sync clients and blocking calls without close(): the process still exits (their loop
    threads are daemons, stopped without waiting from finalizers)."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom sandbox_env import SandboxEnv\n"
        "forgotten = SandboxEnv(sys.argv[1], token=sys.argv[2]).sync().__enter__()\n"
        "forgotten.reset(); print(forgotten.step('print(40 + 2)').observation.stdout, end='')\n"
        "blocking = SandboxEnv(sys.argv[1], token=sys.argv[2]); blocking.reset()\n"
        "print('done')\n")
    out = subprocess.run([sys.executable, "-c", script, live_server.url, live_server.token or ""],
                         capture_output=True, text=True, timeout=120)  # a hang fails here
    assert out.returncode == 0 and out.stdout == "42\ndone\n", (out.stdout, out.stderr[-2000:])
