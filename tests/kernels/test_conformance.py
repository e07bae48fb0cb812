"""Behaviour every execution backend must show; parametrized over `conftest.BACKENDS`.

Timing assertions are deliberately generous (shared, noisy 2-core machines): they prove that a
step cannot hang, not how fast it is.
"""

from __future__ import annotations

import base64
import os
import time
import uuid

import psutil
import pytest
from kernel_helpers import KernelFactory, token, wait_gone, wait_present

from sandbox_env.models import ExecStatus

# A 1x1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


async def test_print(kernel) -> None:
    result = await kernel.execute("print(1)")
    assert result.status is ExecStatus.OK
    assert result.exit_code == 0
    assert result.stdout == "1\n"
    assert result.stderr == ""
    assert result.exception is None
    assert result.wall_time_s > 0


async def test_state_persists(kernel) -> None:
    assert (await kernel.execute("x = 40\nimport math")).status is ExecStatus.OK
    result = await kernel.execute("print(x + 2, math.floor(2.5))")
    assert result.stdout == "42 2\n"


async def test_exception(kernel) -> None:
    result = await kernel.execute("def f():\n    raise ValueError('bad value')\nf()")
    assert result.status is ExecStatus.ERROR
    assert result.exit_code == 1
    assert result.exception is not None
    assert result.exception.type == "ValueError"
    assert result.exception.message == "bad value"
    assert "\x1b" not in result.exception.traceback
    assert "ValueError" in result.exception.traceback and "f()" in result.exception.traceback
    assert "bad value" in result.stderr
    assert (await kernel.execute("print('still here')")).stdout == "still here\n"


async def test_syntax_error(kernel) -> None:
    result = await kernel.execute("def f(:\n    pass")
    assert result.status is ExecStatus.ERROR
    assert result.exception is not None and result.exception.type == "SyntaxError"
    assert "\x1b" not in result.exception.traceback


async def test_stdout_and_stderr(kernel) -> None:
    result = await kernel.execute("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert result.status is ExecStatus.OK
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


async def test_execute_result_and_display(kernel) -> None:
    result = await kernel.execute("6 * 7")
    assert result.status is ExecStatus.OK
    assert result.stdout.strip() == "42"
    code = f"from IPython.display import Image, display\ndisplay(Image(data={PNG!r}))"
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OK
    pngs = [d for d in result.displays if "image/png" in d.data]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0].data["image/png"]) == PNG


async def test_invalid_utf8(kernel) -> None:
    code = "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe\\xc3 end\\n')\nsys.stdout.flush()"
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OK
    assert "ok " in result.stdout and " end" in result.stdout
    assert "\ufffd" in result.stdout
    result.model_dump_json()  # serialisable: a valid reply
    fd_level = await kernel.execute("import os\n_ = os.write(1, b'fd \\xff end\\n')")
    assert fd_level.status is ExecStatus.OK
    fd_level.model_dump_json()


async def test_huge_output_truncated(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(output_bytes=10_000, output_limit_bytes=20_000_000)
    code = "print('HEAD')\nfor i in range(2000):\n    print('x' * 999)\nprint('TAIL')"
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OK
    assert result.stdout_truncated and not result.stderr_truncated
    assert result.stdout.startswith("HEAD\n")
    assert result.stdout.endswith("TAIL\n")
    assert len(result.stdout.encode()) < 12_000


async def test_output_flood(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(output_bytes=10_000, output_limit_bytes=1_000_000, timeout_s=20)
    started = time.monotonic()
    result = await kernel.execute("while True:\n    print('y' * 10_000)")
    assert result.status is ExecStatus.OUTPUT_LIMIT
    assert result.exit_code != 0
    assert result.stdout_truncated
    assert len(result.stdout.encode()) < 12_000
    assert time.monotonic() - started < 20
    assert (await kernel.execute("print('after flood')")).stdout.endswith("after flood\n")


async def test_timeout_then_next_step_works(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=2)
    await kernel.execute("kept = 1")
    started = time.monotonic()
    result = await kernel.execute("while True:\n    pass")
    assert result.status is ExecStatus.TIMEOUT
    assert result.exit_code != 0
    assert time.monotonic() - started < 2 + 5
    after = await kernel.execute("print('alive')")
    assert after.status is ExecStatus.OK and after.stdout == "alive\n"


async def test_timeout_override(kernel) -> None:
    result = await kernel.execute("import time\ntime.sleep(30)", timeout_s=0.5)
    assert result.status is ExecStatus.TIMEOUT
    assert result.wall_time_s < 0.5 + 5


async def test_sigint_ignored_kernel_restarted(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=2, interrupt_grace_s=1)
    await kernel.execute("lost = 1")
    started = time.monotonic()
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    result = await kernel.execute(code)
    assert result.status is ExecStatus.TIMEOUT
    assert time.monotonic() - started < 2 + 1 + 5
    assert kernel.is_alive()
    after = await kernel.execute("print(lost)")
    assert after.status is ExecStatus.ERROR
    assert after.exception is not None and after.exception.type == "NameError"
    assert (await kernel.execute("print(6 * 7)")).stdout == "42\n"


async def test_input_fails_fast(kernel) -> None:
    started = time.monotonic()
    result = await kernel.execute("name = input('name? ')")
    assert result.status is ExecStatus.ERROR
    assert time.monotonic() - started < 5
    assert (await kernel.execute("import sys\nprint(repr(sys.stdin.read()))")).status in (
        ExecStatus.OK, ExecStatus.ERROR)


# How a step ends: (code, status, exit_code, stdout, whether the namespace survives). The code's own
# exit gives its own status, as a program's would; only a signal is `killed` (and on Jupyter what
# was flushed just before a SIGKILL may still be in the kernel's zmq queue: not checked).
EXITS = {
    "sys.exit(7)": ("import sys\nsys.exit(7)", ExecStatus.ERROR, 7, "", True),
    "SystemExit(5)": ("print('before')\nraise SystemExit(5)", ExecStatus.ERROR, 5, "before\n", True),
    "sys.exit(0)": ("import sys\nprint('done')\nsys.exit(0)", ExecStatus.OK, 0, "done\n", True),
    "sys.exit()": ("import sys\nsys.exit()", ExecStatus.OK, 0, "", True),
    "exit(2)": ("exit(2)", ExecStatus.ERROR, 2, "", True),
    "sys.exit(message)": ("import sys\nsys.exit('bye')", ExecStatus.ERROR, 1, "", True),
    "os._exit(3)": ("import os\nprint('flushed', flush=True)\nos._exit(3)", ExecStatus.ERROR, 3, "flushed\n", False),
    "os._exit(0)": ("import os\nprint('flushed', flush=True)\nos._exit(0)", ExecStatus.OK, 0, "flushed\n", False),
    "SIGKILL": ("import os, signal\nprint('x', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)",
                ExecStatus.KILLED, 137, None, False),
}


@pytest.mark.parametrize(("code", "status", "exit_code", "stdout", "kept"), EXITS.values(), ids=EXITS.keys())
async def test_how_a_step_ends(kernel, code: str, status: ExecStatus, exit_code: int, stdout: str | None,
                               kept: bool) -> None:
    await kernel.execute("kept = 41")
    result = await kernel.execute(code)
    assert (result.status, result.exit_code) == (status, exit_code), result.stderr
    assert stdout is None or result.stdout == stdout
    if "SystemExit" in code or "sys.exit" in code or "exit(" in code[:5]:
        assert (result.exception is not None) == (exit_code != 0)
        assert result.exception is None or result.exception.type == "SystemExit"
    after = await kernel.execute("print(kept + 1)")
    assert (after.status is ExecStatus.OK) == kept
    assert (await kernel.execute("print('back')")).stdout.endswith("back\n")


async def test_stray_child_does_not_change_the_exit(kernel) -> None:
    """A child holding stdout outlives its parent's os._exit: the parent's status and output stand."""
    tok = token()
    code = ("import os\nprint('parent', flush=True)\n"
            f"if os.fork() == 0:\n    os.execv('/bin/sleep', [{tok!r}, '300'])\n"
            "os._exit(0)")
    result = await kernel.execute(code)
    assert (result.status, result.exit_code, result.stdout) == (ExecStatus.OK, 0, "parent\n")
    assert (await kernel.execute("print('back')")).stdout.endswith("back\n")
    assert wait_gone(tok) == []  # the interpreter's replacement took the child with it


async def test_subprocess_given_sys_stdout_is_captured(kernel) -> None:
    result = await kernel.execute("import subprocess, sys\n_ = subprocess.run(['echo', 'via fileno'], "
                                  "stdout=sys.stdout, stderr=sys.stderr)")
    assert result.status is ExecStatus.OK
    assert result.stdout == "via fileno\n"


async def test_memory_hog(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(memory_mb=256, timeout_s=20)
    server_rss = psutil.Process().memory_info().rss
    result = await kernel.execute("hog = []\nwhile True:\n    hog.append(b'x' * 10_000_000)")
    assert result.status in (ExecStatus.OOM, ExecStatus.ERROR)
    assert result.exit_code != 0
    assert psutil.Process().memory_info().rss - server_rss < 100 * 2**20
    assert (await kernel.execute("print(6 * 7)")).stdout.endswith("42\n")


async def test_fork_loop_contained(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(pids=32, timeout_s=10)
    tok = token()
    code = (
        "import os\nstarted = 0\n"
        "try:\n"
        "    for _ in range(2000):\n"
        "        if os.fork() == 0:\n"
        f"            os.execv('/bin/sleep', [{tok!r}, '300'])\n"
        "        started += 1\n"
        "except OSError as exc:\n"
        "    print('stopped after', started, type(exc).__name__)\n"
    )
    started = time.monotonic()
    result = await kernel.execute(code)
    assert time.monotonic() - started < 10 + 5
    assert result.status in (ExecStatus.OK, ExecStatus.ERROR, ExecStatus.KILLED, ExecStatus.TIMEOUT)
    assert "stopped after" in result.stdout
    assert len(wait_gone(tok, timeout_s=0)) < 2000
    await kernel.close()
    assert wait_gone(tok) == []


async def test_daemon_gone_after_close(kernel) -> None:
    tok = token()
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(300)', {tok!r}])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "print('daemon started')"
    )
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OK, result.stderr
    assert wait_present(tok), "the daemon should be running before close"
    await kernel.close()
    assert wait_gone(tok) == []


async def test_files_private_and_removed(make_kernel: KernelFactory) -> None:
    first = await make_kernel()
    name = f"episode-{uuid.uuid4().hex}.txt"
    result = await first.execute(f"import os\nopen({name!r}, 'w').write('secret')\nprint(os.path.abspath({name!r}))")
    assert result.status is ExecStatus.OK
    path = result.stdout.strip()
    second = await make_kernel()
    seen = await second.execute(f"import os\nprint(os.path.exists({name!r}), os.listdir('.'))")
    assert seen.stdout.strip() == "False []"  # each kernel starts in its own, empty directory
    await first.close()
    assert not os.path.exists(path)
    after = await second.execute(f"import os\nprint(os.path.exists({path!r}))")
    assert after.stdout.strip() == "False"


async def test_server_env_invisible(make_kernel: KernelFactory) -> None:
    name, value = f"SANDBOX_TEST_CANARY_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    os.environ[name] = value
    try:
        kernel = await make_kernel()
        result = await kernel.execute("import os\nprint(dict(os.environ))")
    finally:
        del os.environ[name]
    assert result.status is ExecStatus.OK
    assert name not in result.stdout and value not in result.stdout


async def test_close_idempotent(kernel) -> None:
    assert kernel.is_alive()
    await kernel.close()
    await kernel.close()
    assert not kernel.is_alive()


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)", "raise SystemExit(2)"])
async def test_sys_exit_is_not_a_crash(kernel, code: str) -> None:
    result = await kernel.execute(code)
    assert result.status in (ExecStatus.OK, ExecStatus.ERROR, ExecStatus.KILLED)
    assert (await kernel.execute("print('ok')")).stdout.endswith("ok\n")
