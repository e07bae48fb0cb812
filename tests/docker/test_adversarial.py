"""The hostile-code list of issue 3, against real containers.

Each case asserts the outcome (status) and that the step returns within its limit plus a generous
margin; the `make_kernel` fixture then checks that no container of the episode survives close.
Timings are not asserted otherwise: the machines are shared and noisy.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from typing import Any

import psutil
import pytest

from sandbox_env.models import ExecStatus

pytestmark = pytest.mark.docker
MARGIN_S = 5.0


def host_processes_with(needle: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if needle in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def wait_present(needle: str, timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while not (found := host_processes_with(needle)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def wait_gone(needle: str, timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := host_processes_with(needle)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


async def timed(kernel: Any, code: str, **kw: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = await kernel.execute(code, **kw)
    return result, time.monotonic() - started


async def assert_fresh_and_working(kernel: Any, lost: str | None = None) -> None:
    if lost is not None:
        gone = await kernel.execute(f"print({lost})")
        assert gone.exception is not None and gone.exception.type == "NameError"
    assert (await kernel.execute("6 * 7")).stdout == "42\n"


async def test_fork_bomb(make_kernel) -> None:
    kernel = await make_kernel(pids=32, timeout_s=3)
    await kernel.execute("kept = 1")
    tok = f"sbx{uuid.uuid4().hex}"
    code = ("import os\nwhile True:\n    try:\n        if os.fork() == 0:\n"
            f"            os.execv('/bin/sleep', [{tok!r}, '300'])\n    except OSError:\n        pass")
    result, took = await timed(kernel, code)
    assert result.status is ExecStatus.TIMEOUT
    assert took < 3 + MARGIN_S
    assert len(host_processes_with(tok)) <= 32
    await assert_fresh_and_working(kernel, lost="kept")
    assert wait_gone(tok, 2) == [], "the runner kills every process after a timeout"


@pytest.mark.parametrize("code", [
    "x = bytearray(10 * 2**30)",
    "x = b' ' * (10 * 2**30)",
    "hog = []\nwhile True:\n    hog.append(bytearray(50 * 2**20))",
])
async def test_memory_bomb(make_kernel, code: str) -> None:
    kernel = await make_kernel(memory_mb=256, timeout_s=20)
    rss = psutil.Process().memory_info().rss
    result, took = await timed(kernel, code)
    assert result.status in (ExecStatus.OOM, ExecStatus.ERROR), result
    if result.status is ExecStatus.ERROR:
        assert result.exception is not None and result.exception.type == "MemoryError"
    assert took < 20 + MARGIN_S
    assert psutil.Process().memory_info().rss - rss < 64 * 2**20
    await assert_fresh_and_working(kernel)


async def test_memory_bomb_reports_oom(make_kernel) -> None:
    kernel = await make_kernel(memory_mb=128, timeout_s=20)
    result = await kernel.execute("hog = []\nwhile True:\n    hog.append(bytearray(8 * 2**20))")
    assert result.status is ExecStatus.OOM
    assert result.exit_code == 137


@pytest.mark.parametrize("where", ["/workspace", "/tmp", "/dev/shm"])
async def test_disk_fill(make_kernel, where: str) -> None:
    kernel = await make_kernel(workspace_mb=32, tmp_mb=16, memory_mb=256, timeout_s=20)
    code = (f"import os\nn = 0\ntry:\n    while True:\n"
            f"        with open(os.path.join({where!r}, f'f{{n}}'), 'wb') as f:\n"
            "            f.write(b'x' * 2**20 * 4)\n        n += 1\n"
            "except OSError as exc:\n    print('stopped', exc.errno, n)")
    result, took = await timed(kernel, code)
    assert result.status is ExecStatus.OK, result
    assert result.stdout.startswith("stopped 28 "), result.stdout  # ENOSPC
    assert took < 20 + MARGIN_S


async def test_single_file_capped_by_fsize(make_kernel) -> None:
    kernel = await make_kernel(file_size_mb=4, workspace_mb=64)
    result = await kernel.execute("open('big', 'wb').write(b'x' * 8 * 2**20)")
    assert result.status is ExecStatus.ERROR
    assert result.exception is not None and "File too large" in result.exception.message


@pytest.mark.parametrize("code", [
    "import sys\nb = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(b)",
    "import os\nb = b'y' * 2**20\nfor _ in range(1024):\n    os.write(1, b)",
    "import subprocess\nsubprocess.run(['yes'])",
    "import sys\nsys.stdout.write('z' * 50_000_000)",
])
async def test_stdout_flood_is_bounded(make_kernel, code: str) -> None:
    kernel = await make_kernel(output_bytes=16_384, output_limit_bytes=4_000_000, timeout_s=20)
    rss = psutil.Process().memory_info().rss
    result, took = await timed(kernel, code)
    assert result.status is ExecStatus.OUTPUT_LIMIT
    assert result.stdout_truncated
    assert len(result.stdout.encode()) < 16_384 + 200
    assert took < 20 + MARGIN_S
    assert psutil.Process().memory_info().rss - rss < 64 * 2**20
    await assert_fresh_and_working(kernel)


async def test_huge_line_under_the_limit_is_truncated(kernel) -> None:
    result = await kernel.execute("import sys\n_ = sys.stdout.write('A' + 'q' * 1_000_000 + 'Z')")
    assert result.status is ExecStatus.OK
    assert result.stdout_truncated
    assert result.stdout.startswith("Aqq") and result.stdout.endswith("qqZ")
    assert "bytes truncated" in result.stdout


async def test_invalid_utf8(kernel) -> None:
    result = await kernel.execute("import os\nos.write(1, b'ok \\xff\\xfe\\xc3 end')\n_ = os.write(2, b'\\x80e')")
    assert result.status is ExecStatus.OK
    assert result.stdout == "ok \ufffd\ufffd\ufffd end"
    assert "\ufffd" in result.stderr
    result.model_dump_json()


async def test_infinite_loop_and_ignored_signals(make_kernel) -> None:
    kernel = await make_kernel(timeout_s=2)
    await kernel.execute("kept = 1")
    code = ("import signal\nfor s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
            "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass")
    result, took = await timed(kernel, code)
    assert result.status is ExecStatus.TIMEOUT and result.exit_code == 124
    assert took < 2 + MARGIN_S
    await assert_fresh_and_working(kernel, lost="kept")


async def test_grandchild_holding_the_pipe(kernel) -> None:
    result, took = await timed(kernel, "import subprocess\nsubprocess.Popen('sleep 300; echo late', shell=True)\n"
                                       "print('spawned')")
    assert result.status is ExecStatus.OK and result.stdout == "spawned\n"
    assert took < 3
    result, took = await timed(kernel, "import os\nif os.fork() == 0:\n    import time\n    time.sleep(300)\n"
                                       "print('parent done')")
    assert result.status is ExecStatus.OK and result.stdout == "parent done\n" and took < 3


async def test_stdin_reads_eof(kernel) -> None:
    result, took = await timed(kernel, "import sys\nprint(repr(sys.stdin.read()))\nimport os\nprint(os.read(0, 10))")
    assert result.status is ExecStatus.OK
    assert result.stdout == "''\nb''\n"
    assert took < 3


async def test_setsid_and_double_fork_daemons_die_with_the_episode(make_kernel, docker_client) -> None:
    kernel = await make_kernel()
    tok = f"sbx{uuid.uuid4().hex}"
    code = ("import os, subprocess\n"
            f"subprocess.Popen(['/bin/sh', '-c', 'sleep 300; true', {tok!r}], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['{tok}', '300'])\n    os._exit(0)\nos.wait()\nprint('ok')")
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OK
    assert len(wait_present(tok)) >= 1, "the daemons run before close"
    kernel_id = kernel.kernel_id
    await kernel.close()
    assert wait_gone(tok) == []
    assert docker_client.containers.list(all=True, filters={"label": f"sandbox-env.episode={kernel_id}"}) == []


async def test_signals_to_init_are_harmless(kernel) -> None:
    await kernel.execute("kept = 1")
    for sig in ("SIGKILL", "SIGTERM", "SIGINT", "SIGSTOP"):
        result = await kernel.execute(f"import os, signal\nos.kill(1, signal.{sig})")
        assert result.status is ExecStatus.OK, (sig, result)
    assert (await kernel.execute("print(kept)")).stdout == "1\n"


async def test_signals_to_everything(kernel) -> None:
    """kill(-1) spares the caller and PID 1 (the supervisor): the zygote dies, the episode goes on,
    and the next program gets a fresh zygote."""
    await kernel.execute("kept = 1")
    result, took = await timed(kernel, "import os, signal\nos.kill(-1, signal.SIGKILL)")
    assert result.status is ExecStatus.OK, result
    assert took < 3 + MARGIN_S
    assert (await kernel.execute("print(kept)")).stdout == "1\n"
    program = await kernel.run_program("print(6 * 7)", timeout_s=5)
    assert program.status is ExecStatus.OK and program.stdout == "42\n", program


async def test_the_supervisor_cannot_be_stopped(make_kernel) -> None:
    """PID 1 ignores signals from inside its namespace: SIGSTOP to it changes nothing, and the
    supervisor itself ends the step at its deadline, in the same container."""
    kernel = await make_kernel(timeout_s=1)
    old = kernel.container_id
    result, took = await timed(kernel, "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\nwhile True: pass")
    assert result.status is ExecStatus.TIMEOUT
    assert "ran past its 1 s limit" in result.stderr, result.stderr
    assert took < 1 + MARGIN_S
    await assert_fresh_and_working(kernel)
    assert kernel.container_id == old


async def test_ctypes_segfault(kernel) -> None:
    await kernel.execute("kept = 1")
    result = await kernel.execute("import ctypes\nctypes.string_at(0)")
    assert result.status is ExecStatus.KILLED
    assert result.exit_code == 139
    await assert_fresh_and_working(kernel, lost="kept")


async def test_deep_recursion(kernel) -> None:
    result = await kernel.execute("def f(n):\n    return f(n + 1)\nf(0)")
    assert result.status is ExecStatus.ERROR
    assert result.exception is not None and result.exception.type == "RecursionError"
    assert len(result.stderr) < 20_000
    result = await kernel.execute("import sys\nsys.setrecursionlimit(10**7)\ndef g(n):\n    return g(n + 1)\ng(0)")
    assert result.status in (ExecStatus.KILLED, ExecStatus.ERROR, ExecStatus.OOM)
    await assert_fresh_and_working(kernel)


async def test_host_secrets_are_invisible(make_kernel) -> None:
    name, value = f"SANDBOX_CANARY_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    os.environ[name] = value
    try:
        kernel = await make_kernel()
    finally:
        del os.environ[name]
    code = ("import os, glob\nprint(dict(os.environ))\n"
            "for pid in ['1', 'self', str(os.getppid())]:\n"
            "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
            "    except OSError as exc:\n        print(pid, exc.errno)\n"
            "print([p for p in ('/var/run/docker.sock', '/run/docker.sock', '/run/containerd/containerd.sock')"
            " if os.path.exists(p)])\nprint(glob.glob('/proc/*/cmdline').__len__())")
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OK
    assert value not in result.stdout and name not in result.stdout
    assert "[]\n" in result.stdout  # no runtime socket
    assert int(result.stdout.strip().splitlines()[-1]) < 10  # own PID namespace


async def test_hardening_probe(kernel) -> None:
    probe = kernel.probe
    assert probe["uid"] != 0 and probe["gid"] != 0
    assert int(probe["CapEff"], 16) == 0 and int(probe["CapBnd"], 16) == 0
    assert probe["NoNewPrivs"] == "1" and probe["Seccomp"] == "2"
    result = await kernel.execute("import os\nprint(open('/proc/self/status').read())")
    assert "NoNewPrivs:\t1" in result.stdout and "Seccomp:\t2" in result.stdout


@pytest.mark.parametrize("path", ["/etc/passwd", "/usr/bin/evil", "/root/x", "/x", "/proc/sys/kernel/core_pattern",
                                  "/sys/fs/cgroup/memory/memory.limit_in_bytes"])
async def test_writes_outside_the_workspace_fail(kernel, path: str) -> None:
    result = await kernel.execute(f"open({path!r}, 'w').write('x')")
    assert result.status is ExecStatus.ERROR
    assert result.exception is not None
    assert result.exception.type in ("OSError", "PermissionError", "FileNotFoundError")


async def test_symlink_to_a_host_file(kernel, tmp_path) -> None:
    canary = tmp_path / "host-canary.txt"
    canary.write_text("host secret")
    code = (f"import os\nos.symlink({str(canary)!r}, 'link')\n"
            "try:\n    print(open('link').read())\nexcept OSError as exc:\n    print('read', exc.errno)\n"
            "try:\n    open('link', 'w').write('overwritten')\nexcept OSError as exc:\n    print('write', exc.errno)\n"
            "os.symlink('/proc/1/root/etc/hostname', 'l2')\nprint(open('l2').read().strip())")
    result = await kernel.execute(code)
    assert "host secret" not in result.stdout
    assert canary.read_text() == "host secret"
    assert socket.gethostname() not in result.stdout.split() or socket.gethostname() == "sandbox"
    info = await kernel.inspect()  # the host never opens workspace paths
    assert "host secret" not in str(info)


async def test_network_only_loopback_and_host_unreachable(kernel) -> None:
    hits: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append("connected")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code = ("import socket\nprint(sorted(n for _, n in socket.if_nameindex()))\n"
                f"for host in ('127.0.0.1', '172.17.0.1', '169.254.169.254', 'example.com'):\n"
                "    try:\n"
                f"        socket.create_connection((host, {port}), timeout=2).close()\n"
                "        print(host, 'CONNECTED')\n"
                "    except OSError as exc:\n"
                "        print(host, type(exc).__name__)")
        result = await kernel.execute(code, timeout_s=15)
    finally:
        server.close()
        await server.wait_closed()
    assert result.status is ExecStatus.OK, result
    lines = result.stdout.splitlines()
    assert lines[0] == "['lo']"
    assert "CONNECTED" not in result.stdout
    assert hits == []
