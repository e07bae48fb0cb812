"""What the fake backend does beyond the shared contract (`test_conformance.py` runs that on it):
per-thread output routing, steps that will not stop, closing mid-step, and its test hooks."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from sandbox_env.errors import KernelDiedError, KernelError
from sandbox_env.kernels import available_kernels, load_kernel_class
from sandbox_env.kernels.fake import FakeKernel
from sandbox_env.kernels.fake_step import install_routers
from sandbox_env.models import ExecStatus
from sandbox_env.testing import small_policy
from sandbox_env.testing.procs import processes_with, token


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Any]:
    made: list[FakeKernel] = []

    async def start(**overrides: Any) -> FakeKernel:
        kernel = FakeKernel(small_policy(**overrides))
        made.append(kernel)
        await kernel.start()
        return kernel

    yield start
    for kernel in made:
        await kernel.close()


def test_registered_and_declares_that_it_is_no_sandbox() -> None:
    assert "fake" in available_kernels() and load_kernel_class("fake") is FakeKernel
    assert FakeKernel.capabilities == frozenset()
    assert "NOT A SANDBOX" in (sys.modules[FakeKernel.__module__].__doc__ or "")


async def test_concurrent_kernels_keep_their_output_apart(make: Any) -> None:
    first, second = await make(), await make()
    code = "import time\nfor i in range(5):\n    print('{name}', i)\n    time.sleep(0.01)"
    a, b = await asyncio.gather(first.execute(code.format(name="a")), second.execute(code.format(name="b")))
    assert a.stdout == "".join(f"a {i}\n" for i in range(5)) and b.stdout.startswith("b 0\n")


async def test_other_threads_print_to_the_real_stream(make: Any, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = await make()
    install_routers()
    printed: list[str] = []

    def outside() -> None:
        print("from another thread")
        printed.append("done")

    step = asyncio.create_task(kernel.execute("import time\ntime.sleep(0.1)\nprint('inside')"))
    await asyncio.sleep(0.02)
    thread = threading.Thread(target=outside)
    thread.start()
    thread.join()
    assert (await step).stdout == "inside\n"
    assert printed and "from another thread" in capsys.readouterr().out


async def test_a_step_that_catches_interrupts_is_abandoned(make: Any) -> None:
    kernel = await make(timeout_s=0.2, interrupt_grace_s=0.2)
    await kernel.execute("kept = 1")
    code = ("import time\nfor _ in range(100):\n    try:\n        time.sleep(0.01)\n"
            "    except KeyboardInterrupt:\n        print('caught')")
    started = time.monotonic()
    result = await kernel.execute(code)
    assert result.status is ExecStatus.TIMEOUT and time.monotonic() - started < 1.5
    after = await kernel.execute("print(kept)")  # abandoned: the namespace was replaced
    assert after.exception is not None and after.exception.type == "NameError"
    assert "caught" not in after.stdout  # the abandoned thread's output reaches no later step


async def test_an_interrupt_that_is_caught_once_is_raised_again(make: Any) -> None:
    kernel = await make(timeout_s=0.2, interrupt_grace_s=2)
    result = await kernel.execute("try:\n    while True: pass\nexcept KeyboardInterrupt:\n    print('once')\n"
                                  "while True: pass")
    assert result.status is ExecStatus.TIMEOUT and result.wall_time_s < 1.5


async def test_closing_during_a_step(make: Any) -> None:
    kernel = await make(timeout_s=5)
    step = asyncio.create_task(kernel.execute("while True: pass"))
    await asyncio.sleep(0.05)
    await kernel.close()
    with pytest.raises(KernelDiedError, match="closed during the step"):
        await step
    with pytest.raises(KernelDiedError):
        await kernel.execute("1")
    with pytest.raises(KernelError):
        await kernel.start()


async def test_hooks_and_lifecycle(make: Any) -> None:
    unstarted = FakeKernel(small_policy())
    assert not unstarted.is_alive()
    with pytest.raises(KernelDiedError, match="not started"):
        await unstarted.execute("1")
    kernel = await make()
    await kernel.execute("class Odd:\n    def __repr__(self): raise RuntimeError\nodd = Odd()\n_hidden = 1")
    seen = await kernel.inspect()
    # listed by type: the raising __repr__ is never called
    assert seen["variables"] == [{"name": "Odd", "type": "type", "repr": "<class __main__.Odd>"},
                                 {"name": "odd", "type": "__main__.Odd", "repr": "<__main__.Odd>"}]
    kernel.crash()
    assert not kernel.is_alive()
    with pytest.raises(KernelDiedError, match="crashed"):
        await kernel.run_program("print(1)", timeout_s=5)
    assert await FakeKernel.setup_backend() == {"isolated": False}


async def test_output_limits_of_a_step(make: Any) -> None:
    kernel = await make(output_bytes=2048, output_limit_bytes=4096)
    flood = await kernel.execute("try:\n    print('x' * 5000)\nexcept BaseException:\n    print('still')")
    assert flood.status is ExecStatus.OUTPUT_LIMIT and "still" not in flood.stdout
    loud = await kernel.execute("raise ValueError('v' * 5000)")  # the traceback itself floods
    assert loud.status is ExecStatus.OUTPUT_LIMIT
    value = await kernel.execute("b'bytes'")
    assert value.stdout == "b'bytes'\n" and value.displays[0].data == {"text/plain": "b'bytes'"}
    assert (await kernel.execute("import sys\nsys.exit(True)")).exit_code == 1  # not an int status


async def test_a_program_that_leaves_a_process_holding_its_output(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sandbox_env.kernels.programs.DRAIN_S", 0.2)
    kernel, tok = await make(), token()
    source = ("import subprocess, sys\n"
              f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', {tok!r}],\n"
              "                 start_new_session=True)\nprint('left one behind')")
    try:
        result = await kernel.run_program(source, timeout_s=60)
        assert result.status is ExecStatus.OK and result.stdout == "left one behind\n", result
        assert processes_with(tok), "the result waited for the process left behind to end"
    finally:
        for pid in processes_with(tok):
            os.kill(pid, signal.SIGKILL)


async def test_the_standard_streams_of_a_step(make: Any) -> None:
    kernel = await make()
    code = ("import io, sys\nsys.stdout.writelines(['a', 'b\\n'])\nsys.stdout.buffer.flush()\n"
            "print(sys.stdout.isatty(), sys.stdout.encoding, sys.stdin.read(), sys.stdin.readlines())\n"
            "try:\n    sys.stdout.fileno()\nexcept io.UnsupportedOperation:\n    print('no fd')\n"
            "sys.stdout.write(b'bytes')")
    result = await kernel.execute(code)
    assert result.stdout == "ab\nFalse utf-8  []\nno fd\n", result
    assert result.exception is not None and result.exception.type == "TypeError"


def test_the_host_keeps_its_streams(capsys: pytest.CaptureFixture[str]) -> None:
    install_routers()
    sys.stdout.writelines(["host ", "line\n"])
    sys.stdout.flush()
    assert isinstance(sys.stdout.isatty(), bool) and sys.stdout.encoding
    assert sys.stdout.closed is False  # anything else is the real stream's
    assert capsys.readouterr().out == "host line\n"


async def test_a_cancelled_step_is_stopped(make: Any) -> None:
    kernel = await make(timeout_s=5)
    await kernel.execute("kept = 1")
    step = asyncio.create_task(kernel.execute("while True: pass"))
    await asyncio.sleep(0.05)
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    after = await kernel.execute("print(kept)")  # a fresh namespace: nothing half-run is kept
    assert after.exception is not None and after.exception.type == "NameError"
    prefix = f"fake-kernel <fake-kernel-{kernel.id}-"
    for _ in range(100):  # the interrupted thread ends by itself, soon
        if not [t for t in threading.enumerate() if t.name.startswith(prefix)]:
            break
        await asyncio.sleep(0.01)
    assert [t.name for t in threading.enumerate() if t.name.startswith(prefix)] == []
