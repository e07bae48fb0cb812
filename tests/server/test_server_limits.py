"""Limits through the server: the outcome status is right, the server stays responsive, and
nothing of an episode (variables, files, processes) survives into the next one."""

from __future__ import annotations

import asyncio
import time

import httpx
import psutil
import pytest

BUSY_SESSIONS = 4
SLEEP_MARK = "31.337"  # children of the fork loop exec `sleep 31.337`, so they can be found

MEMORY_HOG = "chunks = [b'x' * (64 << 20) for _ in range(32)]  # 2 GiB, pages touched"
FORK_LOOP = f"""
import os
n = 0
for _ in range(2000):  # bounded: without a pid limit this ends, and the test fails cleanly
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp("sleep", ["sleep", "{SLEEP_MARK}"])
        finally:
            os._exit(0)
    n += 1
print("forked", n)
"""
OUTPUT_FLOOD = "for _ in range(100_000):\n    print('x' * 999)  # 100 MB, bounded"


async def test_health_answers_during_busy_loops(live_server, ws_session) -> None:
    """Every session spins the CPU; each /health poll must still answer within a second."""
    async with httpx.AsyncClient(base_url=live_server.url, timeout=1.0, headers=live_server.headers) as http:
        async with ws_session(live_server) as s0, ws_session(live_server) as s1, \
                ws_session(live_server) as s2, ws_session(live_server) as s3:
            sessions = [s0, s1, s2, s3][:BUSY_SESSIONS]
            for s in sessions:
                await s.reset()
            steps = [asyncio.create_task(s.step("while True: pass", timeout_s=3))
                     for s in sessions]
            polls = 0
            while not all(t.done() for t in steps):
                reply = await http.get("/health")  # raises ReadTimeout after 1 s
                assert reply.json() == {"status": "healthy"}
                polls += 1
                await asyncio.sleep(0.1)
            results = await asyncio.gather(*steps)
        assert polls >= 10
        assert [r["metadata"]["execution"]["status"] for r in results] == ["timeout"] * BUSY_SESSIONS
        assert all(r["observation"]["exit_code"] != 0 for r in results)


def _survivors() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["cmdline"] == ["sleep", SLEEP_MARK] and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


async def _wait_no_survivors(timeout_s: float = 15.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := _survivors()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return left


@pytest.mark.parametrize(("case", "policy", "code", "expected"), [
    pytest.param("timeout", None, "import time\nwhile True: time.sleep(0.01)", {"timeout"}, id="timeout"),
    pytest.param("memory", None, MEMORY_HOG, {"oom"}, id="memory"),
    # a pid limit makes fork() fail (BlockingIOError) or gets the interpreter killed
    pytest.param("fork", None, FORK_LOOP, {"error", "killed"}, id="fork"),
    pytest.param("output", "strict", OUTPUT_FLOOD, {"output_limit"}, id="output"),
])
async def test_limit(live_server, ws_session, case: str, policy: str | None, code: str,
                     expected: set[str]) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5.0, headers=live_server.headers) as http, \
            ws_session(live_server) as s:
        await s.reset(**({"policy": policy} if policy else {}))
        setup = await s.step("import os\nopen('marker.txt', 'w').write('x')\nleftover = 1\n"
                             "print(os.getcwd())")
        old_cwd = setup["observation"]["stdout"].strip()
        assert old_cwd

        result = await s.step(code, timeout_s=2) if case == "timeout" else await s.step(code)
        execution = result["metadata"]["execution"]
        assert execution["status"] in expected, (case, execution, result["observation"]["stderr"][-2000:])
        assert result["observation"]["exit_code"] != 0
        if case == "fork" and execution["status"] == "error":
            assert execution["exception"]["type"] in ("BlockingIOError", "OSError", "PermissionError")
        if case == "output":
            assert execution["stdout_truncated"] is True
            assert len(result["observation"]["stdout"]) < 2 * (1 << 20)
        assert (await http.get("/health")).json() == {"status": "healthy"}

        # the session goes on, and a new episode starts from nothing
        assert (await s.step("print('alive')"))["observation"]["stdout"] == "alive\n"
        await s.reset()
        check = await s.step(
            "import os\n"
            f"print('leftover' in globals(), os.path.exists('marker.txt'), "
            f"os.path.exists({old_cwd!r} + '/marker.txt'), os.getcwd() == {old_cwd!r})")
        assert check["observation"]["stdout"] == "False False False False\n"
        if case == "fork":
            assert not await _wait_no_survivors()
