"""Checks of `Kernel.execute`: output, errors, limits, and how a step ends.

Timing assertions are deliberately generous (shared, noisy 2-core machines): they prove that a
step cannot hang, not how fast it is. Checks that run code reaching past the interpreter (file
descriptors, processes, the host's files and environment) need the capability that makes that
safe, so they never run on an unisolated backend.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from typing import Any

from sandbox_env.models import ExecStatus
from sandbox_env.testing.procs import own_rss_bytes, sleeper, token, wait_gone, wait_present
from sandbox_env.testing.suite import Harness, check, register

# A 1x1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


@check()
async def prints(h: Harness) -> None:
    result = await (await h.kernel()).execute("print(1)")
    assert (result.status, result.exit_code, result.stdout, result.stderr) == (ExecStatus.OK, 0, "1\n", ""), result
    assert result.exception is None and result.wall_time_s > 0, result


@check()
async def state_persists(h: Harness) -> None:
    kernel = await h.kernel()
    assert (await kernel.execute("x = 40\nimport math")).status is ExecStatus.OK
    result = await kernel.execute("print(x + 2, math.floor(2.5))")
    assert result.stdout == "42 2\n", result


@check()
async def exception(h: Harness) -> None:
    kernel = await h.kernel()
    result = await kernel.execute("def f():\n    raise ValueError('bad value')\nf()")
    assert (result.status, result.exit_code) == (ExecStatus.ERROR, 1), result
    assert result.exception is not None and result.exception.type == "ValueError", result
    assert result.exception.message == "bad value", result.exception
    tb = result.exception.traceback
    assert "\x1b" not in tb and "ValueError" in tb and "f()" in tb, tb
    assert "bad value" in result.stderr, result
    assert (await kernel.execute("print('still here')")).stdout == "still here\n"


@check()
async def syntax_error(h: Harness) -> None:
    result = await (await h.kernel()).execute("def f(:\n    pass")
    assert result.status is ExecStatus.ERROR, result
    assert result.exception is not None and result.exception.type == "SyntaxError", result
    assert "\x1b" not in result.exception.traceback


@check()
async def stdout_and_stderr(h: Harness) -> None:
    result = await (await h.kernel()).execute("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (result.status, result.stdout, result.stderr) == (ExecStatus.OK, "out\n", "err\n"), result


@check()
async def last_expression_shown(h: Harness) -> None:
    result = await (await h.kernel()).execute("6 * 7")
    assert result.status is ExecStatus.OK and result.stdout.strip() == "42", result


@check("rich_display")
async def rich_display(h: Harness) -> None:
    code = f"from IPython.display import Image, display\ndisplay(Image(data={PNG!r}))"
    result = await (await h.kernel()).execute(code)
    assert result.status is ExecStatus.OK, result
    pngs = [d for d in result.displays if "image/png" in d.data]
    assert len(pngs) == 1 and base64.b64decode(pngs[0].data["image/png"]) == PNG, result.displays


@check()
async def invalid_utf8(h: Harness) -> None:
    code = "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe\\xc3 end\\n')\nsys.stdout.flush()"
    result = await (await h.kernel()).execute(code)
    assert result.status is ExecStatus.OK, result
    assert "ok " in result.stdout and " end" in result.stdout and "\ufffd" in result.stdout, result
    result.model_dump_json()  # serialisable: a valid reply


@check("fd_output")
async def invalid_utf8_at_fd_level(h: Harness) -> None:
    result = await (await h.kernel()).execute("import os\n_ = os.write(1, b'fd \\xff end\\n')")
    assert result.status is ExecStatus.OK, result
    result.model_dump_json()


@check()
async def huge_output_truncated(h: Harness) -> None:
    kernel = await h.kernel(output_bytes=10_000, output_limit_bytes=20_000_000)
    result = await kernel.execute("print('HEAD')\nfor i in range(2000):\n    print('x' * 999)\nprint('TAIL')")
    assert result.status is ExecStatus.OK, result
    assert result.stdout_truncated and not result.stderr_truncated, result
    assert result.stdout.startswith("HEAD\n") and result.stdout.endswith("TAIL\n"), result
    assert len(result.stdout.encode()) < 12_000


@check()
async def output_flood(h: Harness) -> None:
    kernel = await h.kernel(output_bytes=10_000, output_limit_bytes=1_000_000, timeout_s=20)
    started = time.monotonic()
    result = await kernel.execute("while True:\n    print('y' * 10_000)")
    assert result.status is ExecStatus.OUTPUT_LIMIT and result.exit_code != 0, result
    assert result.stdout_truncated and len(result.stdout.encode()) < 12_000, result
    assert time.monotonic() - started < 20
    assert (await kernel.execute("print('after flood')")).stdout.endswith("after flood\n")


@check()
async def timeout_then_next_step_works(h: Harness) -> None:
    kernel = await h.kernel(timeout_s=1)
    await kernel.execute("kept = 1")
    started = time.monotonic()
    result = await kernel.execute("while True:\n    pass")
    assert result.status is ExecStatus.TIMEOUT and result.exit_code != 0, result
    assert time.monotonic() - started < 1 + 5
    after = await kernel.execute("print('alive')")
    assert after.status is ExecStatus.OK and after.stdout == "alive\n", after


@check()
async def timeout_override(h: Harness) -> None:
    """A step's own limit; the code sits in a sleep (a backend that cannot kill it gives up on it)."""
    result = await (await h.kernel()).execute("import time\ntime.sleep(30)", timeout_s=0.5)
    assert result.status is ExecStatus.TIMEOUT and result.wall_time_s < 0.5 + 5, result


@check("hard_kill")
async def sigint_ignored_kernel_restarted(h: Harness) -> None:
    kernel = await h.kernel(timeout_s=2, interrupt_grace_s=1)
    await kernel.execute("lost = 1")
    started = time.monotonic()
    result = await kernel.execute("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
    assert result.status is ExecStatus.TIMEOUT, result
    assert time.monotonic() - started < 2 + 1 + 5
    assert kernel.is_alive()
    after = await kernel.execute("print(lost)")
    assert after.status is ExecStatus.ERROR and after.exception is not None, after
    assert after.exception.type == "NameError", after
    assert (await kernel.execute("print(6 * 7)")).stdout == "42\n"


@check()
async def input_fails_fast(h: Harness) -> None:
    kernel = await h.kernel()
    started = time.monotonic()
    result = await kernel.execute("name = input('name? ')")
    assert result.status is ExecStatus.ERROR and time.monotonic() - started < 5, result
    read = await kernel.execute("import sys\nprint(repr(sys.stdin.read()))")
    assert read.status in (ExecStatus.OK, ExecStatus.ERROR), read


# How a step ends: (code, status, exit_code, stdout, whether the namespace survives, capabilities).
# The code's own exit gives its own status, as a program's would; only a signal is `killed` (and on
# Jupyter what was flushed just before a SIGKILL may still be in the kernel's zmq queue: not checked).
EXITS: dict[str, tuple[str, ExecStatus, int, str | None, bool, tuple[str, ...]]] = {
    "sys.exit(7)": ("import sys\nsys.exit(7)", ExecStatus.ERROR, 7, "", True, ()),
    "SystemExit(5)": ("print('before')\nraise SystemExit(5)", ExecStatus.ERROR, 5, "before\n", True, ()),
    "sys.exit(0)": ("import sys\nprint('done')\nsys.exit(0)", ExecStatus.OK, 0, "done\n", True, ()),
    "sys.exit()": ("import sys\nsys.exit()", ExecStatus.OK, 0, "", True, ()),
    "exit(2)": ("exit(2)", ExecStatus.ERROR, 2, "", True, ()),
    "sys.exit(message)": ("import sys\nsys.exit('bye')", ExecStatus.ERROR, 1, "", True, ()),
    "os._exit(3)": ("import os\nprint('flushed', flush=True)\nos._exit(3)", ExecStatus.ERROR, 3, "flushed\n",
                    False, ("process_exit",)),
    "os._exit(0)": ("import os\nprint('flushed', flush=True)\nos._exit(0)", ExecStatus.OK, 0, "flushed\n",
                    False, ("process_exit",)),
    "SIGKILL": ("import os, signal\nprint('x', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)",
                ExecStatus.KILLED, 137, None, False, ("process_exit",)),
}


def _step_ends(label: str) -> Any:
    code, status, exit_code, stdout, kept, _ = EXITS[label]

    async def run(h: Harness) -> None:
        kernel = await h.kernel()
        await kernel.execute("kept = 41")
        result = await kernel.execute(code)
        assert (result.status, result.exit_code) == (status, exit_code), result
        assert stdout is None or result.stdout == stdout, result
        if "SystemExit" in code or "sys.exit" in code or code.startswith("exit("):
            # SystemExit: an exception exactly when the status is not 0
            assert (result.exception is not None) == (exit_code != 0), result
            assert result.exception is None or result.exception.type == "SystemExit", result
        after = await kernel.execute("print(kept + 1)")
        assert (after.status is ExecStatus.OK) == kept, after
        assert (await kernel.execute("print('back')")).stdout.endswith("back\n")
    return run


for _label, _row in EXITS.items():
    register(f"step_ends_by_{_label}", _step_ends(_label), _row[5], f"a step that ends by {_label}")


@check("process_cleanup")
async def stray_child_does_not_change_the_exit(h: Harness) -> None:
    """A child holding stdout outlives its parent's os._exit: the parent's status and output stand."""
    kernel, tok = await h.kernel(), token()
    code = f"import os\nprint('parent', flush=True)\nif os.fork() == 0:\n    {sleeper(tok)}\nos._exit(0)"
    result = await kernel.execute(code)
    assert (result.status, result.exit_code, result.stdout) == (ExecStatus.OK, 0, "parent\n"), result
    assert (await kernel.execute("print('back')")).stdout.endswith("back\n")
    assert await wait_gone(tok) == []  # the interpreter's replacement took the child with it


@check("fd_output")
async def subprocess_given_sys_stdout_is_captured(h: Harness) -> None:
    result = await (await h.kernel()).execute(
        "import subprocess, sys\n_ = subprocess.run(['echo', 'via fileno'], stdout=sys.stdout, stderr=sys.stderr)")
    assert result.status is ExecStatus.OK and result.stdout == "via fileno\n", result


@check("memory_limit")
async def memory_hog(h: Harness) -> None:
    kernel = await h.kernel(memory_mb=256, timeout_s=20)
    server_rss = own_rss_bytes()
    result = await kernel.execute("hog = []\nwhile True:\n    hog.append(b'x' * 10_000_000)")
    assert result.status in (ExecStatus.OOM, ExecStatus.ERROR) and result.exit_code != 0, result
    assert own_rss_bytes() - server_rss < 100 * 2**20
    assert (await kernel.execute("print(6 * 7)")).stdout.endswith("42\n")


@check("process_limit", "process_cleanup")
async def fork_loop_contained(h: Harness) -> None:
    kernel, tok = await h.kernel(pids=32, timeout_s=10), token()
    code = ("import os\nstarted = 0\ntry:\n    for _ in range(2000):\n        if os.fork() == 0:\n"
            f"            {sleeper(tok)}\n        started += 1\n"
            "except OSError as exc:\n    print('stopped after', started, type(exc).__name__)\n")
    started = time.monotonic()
    result = await kernel.execute(code)
    assert time.monotonic() - started < 10 + 5
    assert result.status in (ExecStatus.OK, ExecStatus.ERROR, ExecStatus.KILLED, ExecStatus.TIMEOUT), result
    assert "stopped after" in result.stdout, result
    assert len(await wait_gone(tok, timeout_s=0)) < 2000
    await kernel.close()
    assert await wait_gone(tok) == []


@check("process_cleanup")
async def daemon_gone_after_close(h: Harness) -> None:
    kernel, tok = await h.kernel(), token()
    code = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(300)', {tok!r}])\n"
            "    os._exit(0)\nos.wait()\nprint('daemon started')")
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OK, result
    assert await wait_present(tok), "the daemon should be running before close"
    await kernel.close()
    assert await wait_gone(tok) == []


@check("isolation")
async def files_private_and_removed(h: Harness) -> None:
    first, name = await h.kernel(), f"episode-{uuid.uuid4().hex}.txt"
    result = await first.execute(f"import os\nopen({name!r}, 'w').write('secret')\nprint(os.path.abspath({name!r}))")
    assert result.status is ExecStatus.OK, result
    path = result.stdout.strip()
    second = await h.kernel()
    seen = await second.execute(f"import os\nprint(os.path.exists({name!r}), os.listdir('.'))")
    assert seen.stdout.strip() == "False []", seen  # each kernel starts in its own, empty directory
    await first.close()
    assert not os.path.exists(path)
    after = await second.execute(f"import os\nprint(os.path.exists({path!r}))")
    assert after.stdout.strip() == "False", after


@check("isolation")
async def server_env_invisible(h: Harness) -> None:
    name, value = f"SANDBOX_TEST_CANARY_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    os.environ[name] = value
    try:
        kernel = await h.kernel()
        result = await kernel.execute("import os\nprint(dict(os.environ))")
    finally:
        del os.environ[name]
    assert result.status is ExecStatus.OK, result
    assert name not in result.stdout and value not in result.stdout


@check()
async def close_idempotent(h: Harness) -> None:
    kernel = await h.kernel()
    assert kernel.is_alive()
    await kernel.close()
    await kernel.close()
    assert not kernel.is_alive()
