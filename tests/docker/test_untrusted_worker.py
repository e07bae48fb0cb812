"""What the worker (episode code) says about itself is checked by the supervisor: it cannot
override the channel's fields, stall or break the server with its reports, desynchronise later
steps, or change how programs start."""

from __future__ import annotations

import json
import os

import pytest

from sandbox_env.models import ExecStatus

# The worker object and a frame writer of the code's own (the worker's result pipe is `w.res`).
WORKER = ("import gc, json, os, struct\n"
          "w = [o for o in gc.get_objects() if type(o).__name__ == 'Worker'][0]\n"
          "def write_frame(fd, obj):\n"
          "    data = json.dumps(obj).encode()\n"
          "    os.write(fd, struct.pack('>I', len(data)) + data)\n")


async def test_inspect_takes_only_the_namespace_from_the_worker(kernel) -> None:
    patch = ("import sys\nm = sys.modules['sandbox_env.inside.worker']\norig = m.write_frame\n"
             "def forged(fd, obj):\n"
             "    if 'snapshot' in obj:\n"
             "        obj = {**obj, 'backend': 'jupyter', 'container_id': 'forged', 'id': 424242,\n"
             "               'op': 'anomaly', 'why': 'x\\nFORGED LOG LINE', 'processes': -1}\n"
             "    orig(fd, obj)\n"
             "m.write_frame = forged\nx = 1\n")
    assert (await kernel.execute(patch)).status is ExecStatus.OK
    container = kernel.container_id
    seen = await kernel.inspect()
    assert seen["backend"] == "docker" and seen["container_id"] == container, seen
    assert seen["processes"] != -1 and "x" in [v["name"] for v in seen["variables"]], seen
    assert kernel.container_id == container and kernel._boot_task is None  # no false anomaly


@pytest.mark.parametrize("displays", [
    "[{'kind': 'display_data', 'data': {'text/plain': str(i)}, 'metadata': {}} for i in range(10_000)]",
    "[{'kind': 'display_data', 'data': {'application/json': nested}, 'metadata': {}}]",
], ids=["many", "deep"])
async def test_a_forged_report_is_bounded(kernel, displays: str) -> None:
    """The code answers for its own step with displays past the count or depth bounds: the
    supervisor drops them and says so; the step is still an observation, and the episode goes on."""
    code = (WORKER + "nested = 'leaf'\nfor _ in range(900):\n    nested = [nested]\n"
            f"write_frame(w.res, {{'seq': w.last_seq, 'exception': None, 'displays': {displays}}})\n")
    assert (await kernel.execute("kept = 1")).status is ExecStatus.OK
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OK, result
    assert len(result.displays) <= 64 and "malformed (displays)" in result.stderr, result.stderr
    assert json.dumps(result.model_dump(mode="json"))  # serialisable: the server can send it
    assert (await kernel.execute("print(kept)")).stdout == "1\n"


async def test_a_reply_written_by_the_code_does_not_shift_later_steps(kernel) -> None:
    """The code can answer for its own step (it reaches its result pipe), but the real reply that
    follows is dropped: every later step gets its own result."""
    forged = WORKER + ("write_frame(w.res, {'seq': getattr(w, 'last_seq', None), 'exception': None, 'displays': []})\n"
                       "import time\ntime.sleep(0.5)\nprint('late')\n")
    await kernel.execute(forged)
    assert (await kernel.execute("1 / 0")).status is ExecStatus.ERROR
    assert (await kernel.execute("print('third')")).stdout.endswith("third\n")
    assert (await kernel.execute("print('fourth')")).stdout == "fourth\n"


async def test_programs_start_with_python_signal_dispositions(kernel) -> None:
    code = ("import signal\n"
            "print([signal.getsignal(s) == signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGHUP, "
            "signal.SIGUSR1, signal.SIGALRM)], signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
            "signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN)")
    result = await kernel.run_program(code, timeout_s=5)
    assert result.stdout == "[True, True, True, True] True True\n", result


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the test calls ioprio_set by its x86_64 number")
async def test_an_idle_io_class_on_the_supervisor_retires_the_container(kernel) -> None:
    old = kernel.container_id
    step = await kernel.execute("import ctypes\nprint(ctypes.CDLL(None).syscall(251, 1, 1, 3 << 13))")
    assert step.stdout == "0\n", step  # ioprio_set(IOPRIO_WHO_PROCESS, 1, IDLE) succeeds
    result = await kernel.run_program("print(1)", timeout_s=5)
    assert result.stdout == "1\n"
    assert (await kernel.execute("print(2)")).stdout == "2\n" and kernel.container_id != old
