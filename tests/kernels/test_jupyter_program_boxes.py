"""`run_program` on forked kernels (kernels/jupyter/boxes.py): the program is forked from the
program template into a sandbox built ahead, and is as isolated as one bwrap started: its own
uid, no capability, no_new_privs, seccomp, namespaces and cgroup limits, a fresh workspace per
run, nothing of a kernel's processes in sight. The exec path (no root, no cgroups) stays."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from kernel_helpers import KernelFactory, missing
from test_jupyter_template import IDENTITY, NAMESPACES, at_random

from sandbox_env.kernels.jupyter import boxes
from sandbox_env.kernels.jupyter import template as template_module
from sandbox_env.kernels.jupyter.limits import Confinement
from sandbox_env.models import ExecStatus

pytestmark = pytest.mark.slow
MARK = "@@box@@"
# Forked: the program's parent (the template's child) is outside its pid namespace, so PPid is 0,
# and the template's preloaded modules are there before any import. Exec'd by bwrap: PPid is its
# init (1), and `python -I -c` has not loaded hmac.
HOW = """
import sys
_st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)
_out = {'ppid': int(_st['PPid']), 'preloaded': 'hmac' in sys.modules}
"""


@pytest.fixture
def backend() -> str:
    return "jupyter"


@pytest.fixture(params=["forked", "exec"])
def start_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(template_module, "FORKING", request.param == "forked")
    return str(request.param)


def require_root() -> None:
    if os.geteuid() != 0:
        missing("forked programs need a root server")


async def run(kernel: Any, code: str, **values: Any) -> Any:
    """Run `code` as a program with `values` bound; it leaves its answer in `_out`."""
    prelude = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    result = await kernel.run_program(f"{prelude}{code}\nimport json as _j\nprint({MARK!r} + _j.dumps(_out))",
                                      timeout_s=20)
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    assert lines, f"the program reported nothing: {result.status} {result.stdout[-1000:]} {result.stderr[-3000:]}"
    return json.loads(lines[-1][len(MARK):])


async def test_the_program_is_forked_where_kernels_are_and_exec_d_elsewhere(make_kernel: KernelFactory,
                                                                           start_path: str) -> None:
    require_root()
    kernel = await make_kernel()
    for _ in range(2):  # the first run builds its box now, the second takes the one built ahead
        seen = await run(kernel, HOW)
        assert (seen["ppid"] == 0 and seen["preloaded"]) == (start_path == "forked"), seen


async def test_a_forked_program_is_as_confined_as_a_kernel(make_kernel: KernelFactory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Identity, privileges and namespaces (none the server's), nothing of the server's environment."""
    require_root()
    monkeypatch.setenv("SBX_SERVER_SECRET", "canary-of-the-server")
    template_module.template("program").close()  # started again, with the canary in the server's environment
    kernel = await make_kernel()
    await kernel.run_program("pass", timeout_s=10)
    seen = await run(kernel, IDENTITY + "\n_identity = _out\n" + HOW + "\n_out.update(_identity)",
                     NAMESPACES=NAMESPACES)
    assert seen["ppid"] == 0 and seen["preloaded"], seen
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(seen[cap], 16) == 0, (cap, seen[cap])
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2" and seen["Groups"] == "", seen
    assert seen["uid"] == kernel._lease.uid and seen["uid"] not in (0, os.getuid()), seen  # type: ignore[attr-defined]
    ours = {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in NAMESPACES}
    assert all(seen["ns"][n] != ours[n] for n in NAMESPACES), (seen["ns"], ours)
    assert "canary-of-the-server" not in seen["environ"] + repr(seen["env"])
    assert seen["env"]["HOME"] == str(kernel.workdir)


HOLDER = """
import os
def _status(pid):
    return dict(l.split(':\\t', 1) for l in open(f'/proc/{pid}/status').read().splitlines() if ':\\t' in l)
_holder = next(p for p in os.listdir('/proc') if p.isdigit() and open(f'/proc/{p}/comm').read().strip() == 'sleep')
_st = _status(_holder)
_out = {k: _st[k].split()[0] for k in ('Uid', 'CapEff', 'CapPrm', 'CapBnd', 'NoNewPrivs', 'Seccomp')}
try:
    open(f'/proc/{_holder}/environ').read()
    _out['environ'] = 'readable'
except OSError:
    _out['environ'] = 'refused'
try:
    os.kill(int(_holder), 0)
    _out['signal'] = 'allowed'
except OSError:
    _out['signal'] = 'refused'
"""


async def test_the_box_holder_is_a_capless_root_the_program_cannot_touch(make_kernel: KernelFactory) -> None:
    """What keeps a box's namespaces alive is not the sandbox's uid (as bwrap's init is not): the
    program, and a submission its grader runs, can neither read its /proc files nor signal it."""
    require_root()
    kernel = await make_kernel()
    await kernel.run_program("pass", timeout_s=10)
    seen = await run(kernel, HOLDER)
    assert seen["Uid"] == "0" and int(seen["CapEff"], 16) == int(seen["CapPrm"], 16) == int(seen["CapBnd"], 16) == 0, seen
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2", seen
    assert seen["environ"] == "refused" and seen["signal"] == "refused", seen


async def test_every_run_gets_a_fresh_sandbox(make_kernel: KernelFactory) -> None:
    """Files in the workspace, /tmp and /dev/shm, and processes left running, are gone by the next
    run; its namespaces are new."""
    require_root()
    kernel = await make_kernel()
    plant = ("import os, subprocess\n"
             "for path in ('planted', '/tmp/planted', '/dev/shm/planted'): open(path, 'w').write('x')\n"
             "subprocess.Popen(['sleep', '987653'], start_new_session=True)\n"
             "_out = {'ns': os.stat('/proc/self/ns/pid').st_ino}")
    look = ("import os\n"
            "_out = {'files': [p for p in ('planted', '/tmp/planted', '/dev/shm/planted') if os.path.exists(p)],\n"
            "        'cmds': [open(f'/proc/{p}/cmdline').read() for p in os.listdir('/proc') if p.isdigit()],\n"
            "        'ns': os.stat('/proc/self/ns/pid').st_ino}")
    first = await run(kernel, plant)
    second = await run(kernel, look)
    assert second["files"] == [], second
    assert not any("987653" in cmd for cmd in second["cmds"]), second
    assert second["ns"] != first["ns"]


async def test_limits_and_outcomes_hold_in_a_forked_program(make_kernel: KernelFactory) -> None:
    require_root()
    kernel = await make_kernel(memory_mb=128, pids=16, output_limit_bytes=100_000)
    await kernel.run_program("pass", timeout_s=10)  # the next runs take boxes built ahead
    oom = await kernel.run_program("x = bytearray(512 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])",
                                   timeout_s=20)
    assert oom.status is ExecStatus.OOM, oom
    slow = await kernel.run_program("import time\ntime.sleep(60)", timeout_s=1)
    assert slow.status is ExecStatus.TIMEOUT, slow
    loud = await kernel.run_program("while True: print('x' * 1000)", timeout_s=20)
    assert loud.status is ExecStatus.OUTPUT_LIMIT, loud
    bomb = await kernel.run_program(
        "import subprocess\nprocs = []\ntry:\n"
        "    for _ in range(64): procs.append(subprocess.Popen(['sleep', '30']))\n"
        "except OSError as exc:\n    print('refused', exc.errno, len(procs))", timeout_s=20)
    assert "refused" in bomb.stdout and int(bomb.stdout.split()[-1]) < 16, bomb
    killed = await kernel.run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", timeout_s=10)
    assert killed.status is ExecStatus.KILLED, killed
    ok = await kernel.run_program("import sys\nprint(sys.stdin.read()[::-1])", stdin=b"olleh", timeout_s=10)
    assert ok.status is ExecStatus.OK and ok.stdout == "hello\n", ok


async def test_a_forked_program_exits_as_the_interpreter_would(make_kernel: KernelFactory) -> None:
    require_root()
    kernel = await make_kernel()
    error = await kernel.run_program("1 / 0", timeout_s=10)
    assert error.status is ExecStatus.ERROR and error.exit_code == 1, error
    assert error.stderr.startswith("Traceback (most recent call last):\n  File \"<string>\", line 1, in <module>\n")
    assert (await kernel.run_program("raise SystemExit(3)", timeout_s=10)).exit_code == 3
    said = await kernel.run_program("import sys\nsys.exit('bye')", timeout_s=10)
    assert said.exit_code == 1 and said.stderr == "bye\n", said
    late = await kernel.run_program(
        "import atexit, threading, time\natexit.register(print, 'atexit')\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\nprint('main', end=' ')",
        timeout_s=10)
    assert late.stdout == "main thread\natexit\n", late


async def test_a_program_compiles_and_runs_what_it_writes(make_kernel: KernelFactory) -> None:
    """Subprocesses, and executables written in its workspace (the grader's compiled languages)."""
    require_root()
    kernel = await make_kernel()
    await kernel.run_program("pass", timeout_s=10)
    result = await kernel.run_program(
        "import os, subprocess\nopen('tool.sh', 'w').write('#!/bin/sh\\necho tool $1\\n')\nos.chmod('tool.sh', 0o755)\n"
        "print(subprocess.run(['./tool.sh', 'ran'], capture_output=True, text=True).stdout, end='')", timeout_s=20)
    assert result.status is ExecStatus.OK and result.stdout == "tool ran\n", result


async def test_a_program_after_agent_code_meets_nothing_of_it(make_kernel: KernelFactory) -> None:
    """Episode-bound grading: the kernel ran the agent's code, which left a process and files; the
    program sees none of them, and no box built ahead outlives the kernel's start again."""
    require_root()
    kernel = await make_kernel()
    await kernel.run_program("pass", timeout_s=10)  # a box is built ahead now
    await asyncio.sleep(0.5)
    left = await kernel.execute("import subprocess\nopen('/tmp/agent', 'w').write('x')\n"
                                "subprocess.Popen(['sleep', '987654'], start_new_session=True)")
    assert left.status is ExecStatus.OK, left
    assert kernel._spare._next is None, "a box built ahead outlived the kernel's start"  # type: ignore[attr-defined]
    uid = kernel._lease.uid  # type: ignore[attr-defined]
    agent = [p for p in psutil.process_iter(["uids", "cmdline"]) if p.info["uids"].real == uid]
    assert any("987654" in (p.info["cmdline"] or []) for p in agent)
    seen = await run(kernel, "import os\n_out = {'tmp': os.path.exists('/tmp/agent'), "
                             "'cmds': [open(f'/proc/{p}/cmdline').read() for p in os.listdir('/proc') if p.isdigit()]}")
    assert not seen["tmp"] and not any("987654" in cmd for cmd in seen["cmds"]), seen
    assert not [p for p in psutil.process_iter(["cmdline"]) if "987654" in (p.info["cmdline"] or [])]


async def test_a_program_shares_no_secret_of_its_process_with_kernels(make_kernel: KernelFactory) -> None:
    """Programs and kernels come from different templates (the grader parses what a kernel's
    agent could send it)."""
    require_root()
    kernel = await make_kernel()
    cur = kernel._cur  # type: ignore[attr-defined]
    kernel_pid = next(p for p in cur.conf.pids() - {cur.relay.pid}
                      if open(f"/proc/{p}/comm").read().strip().startswith("python"))
    kernel_random = at_random(kernel_pid)
    seen = await run(kernel, "import struct\n"
                             "_a = dict(struct.iter_unpack('QQ', open('/proc/self/auxv', 'rb').read()))[25]\n"
                             "_m = open('/proc/self/mem', 'rb'); _m.seek(_a)\n_out = {'random': _m.read(16).hex()}")
    assert seen["random"] != kernel_random.hex()


async def test_a_cancelled_run_leaves_nothing(make_kernel: KernelFactory) -> None:
    require_root()
    kernel = await make_kernel()
    await kernel.run_program("pass", timeout_s=10)
    uid = kernel._lease.uid  # type: ignore[attr-defined]
    running = asyncio.ensure_future(kernel.run_program("import time\ntime.sleep(60)", timeout_s=60))
    await asyncio.sleep(1.0)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    after = await kernel.run_program("print('next')", timeout_s=10)
    assert after.stdout == "next\n", after
    await kernel.close()
    left = [p.info for p in psutil.process_iter(["pid", "name", "uids"]) if p.info["uids"].real == uid]
    assert left == [], left


async def until(condition: Callable[[], Any], what: str, deadline_s: float = 30.0) -> Any:
    """`condition()` once it holds (a generous deadline: only a broken kernel reaches it)."""
    end = time.monotonic() + deadline_s
    while not (value := condition()):
        assert time.monotonic() < end, f"never happened: {what}"
        await asyncio.sleep(0.01)
    return value


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    except OSError:
        return {}


async def waiting_program(kernel: Any) -> int:
    """The process of the box built ahead, once it is the sandbox's uid under its seccomp filter
    (from then on it only waits for its source)."""
    box = await kernel._spare._next
    uid = str(kernel._lease.uid)

    def ready() -> int | None:
        for pid in box.conf.pids():
            st = _status(pid)
            if st.get("Uid", "").split()[:1] == [uid] and st.get("Seccomp", "").strip() == "2":
                return pid
        return None

    return int(await until(ready, "the box's program waits for its source"))


async def test_a_cancelled_long_write_never_writes_into_a_reused_descriptor(make_kernel: KernelFactory,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Any) -> None:
    """A source over a pipe's size is written from a thread. A run cancelled meanwhile must not
    close the descriptor under that write: its number goes to the next file the server opens,
    and once the reader is gone the write would go on into that file."""
    require_root()
    kernel = await make_kernel()
    await kernel.run_program("pass", timeout_s=10)  # a box waits for the next program
    os.kill(await waiting_program(kernel), signal.SIGSTOP)  # a reader that takes no more than the pipe holds
    started, ended = threading.Event(), threading.Event()
    write_all = boxes._write_all

    def traced(fd: int, data: bytes) -> None:
        started.set()
        try:
            write_all(fd, data)
        finally:
            ended.set()

    monkeypatch.setattr(boxes, "_write_all", traced)
    running = asyncio.ensure_future(kernel.run_program("#" + "x" * (4 << 20) + "\nprint(1)\n", timeout_s=60))
    assert await asyncio.to_thread(started.wait, 30)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    # At once, before the box's destruction (in the background) kills the reader:
    victims = [open(tmp_path / f"victim{i}", "wb", buffering=0) for i in range(16)]  # noqa: SIM115
    try:
        assert await asyncio.to_thread(ended.wait, 60), "the source's write never ended"
    finally:
        for victim in victims:
            victim.close()
    assert [os.path.getsize(tmp_path / f"victim{i}") for i in range(16)] == [0] * 16


async def test_no_box_is_built_for_a_kernel_closed_during_a_run(make_kernel: KernelFactory) -> None:
    require_root()
    kernel = await make_kernel()
    await kernel.run_program("pass", timeout_s=10)
    await waiting_program(kernel)  # the box built ahead is ready: the run starts at once
    running = asyncio.ensure_future(kernel.run_program("import time\ntime.sleep(5)", timeout_s=30))
    await until(lambda: kernel._spare._next is None, "the run takes the box")  # type: ignore[attr-defined]
    await kernel.close()
    assert not running.done(), "the program ended before close(): nothing tested"
    await running
    assert kernel._spare._next is None, "a box was built for a closed kernel"  # type: ignore[attr-defined]
    # the run's own box is destroyed in the background (close() had returned: nothing else waits)
    await asyncio.gather(*kernel._teardowns)  # type: ignore[attr-defined]


async def test_a_run_cancelled_while_it_stops_the_kernel_leaves_the_next_step_a_fresh_kernel(
        make_kernel: KernelFactory, start_path: str) -> None:
    """Not the note of a kernel that died between steps: run_program stopped it on purpose."""
    kernel = await make_kernel()
    running = asyncio.ensure_future(kernel.run_program("print(1)", timeout_s=10))
    await until(lambda: kernel._cur is None, "the run stops the kernel")  # type: ignore[attr-defined]
    assert any(not t.done() for t in kernel._teardowns)  # type: ignore[attr-defined]  # still stopping it
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    after = await kernel.execute("print('hi')")
    assert after.status is ExecStatus.OK and after.stdout == "hi\n" and after.stderr == "", after


async def test_the_first_program_is_forked_once_no_process_of_the_kernel_is_left(
        make_kernel: KernelFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The box is built while the kernel is torn down, but the program's process (the kernel's
    uid) is forked into it only after: here the kernel's processes outlive the holder's start."""
    require_root()
    kernel = await make_kernel()
    uid = kernel._lease.uid  # type: ignore[attr-defined]
    await kernel.execute("import subprocess\nsubprocess.Popen(['sleep', '987655'], start_new_session=True)")
    holder_up = threading.Event()
    held_pid, kill_all, fork_program = boxes.held_pid, Confinement.kill_all, boxes.fork_program

    def held(bwrap: int) -> int | None:
        pid = held_pid(bwrap)
        if pid is not None:  # once the build took its next step (forked its program, or waits)
            asyncio.get_running_loop().call_soon(holder_up.set)
        return pid

    def slow_kill_all(conf: Confinement, *args: Any, **kwargs: Any) -> bool:
        holder_up.wait(30)  # the kernel's processes live until the box's holder runs
        return kill_all(conf, *args, **kwargs)

    alive: list[list[int]] = []

    async def fork(*args: Any, **kwargs: Any) -> Any:
        alive.append([p.pid for p in psutil.process_iter(["uids", "status"])
                      if p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE])
        return await fork_program(*args, **kwargs)

    monkeypatch.setattr(boxes, "held_pid", held)
    monkeypatch.setattr(Confinement, "kill_all", slow_kill_all)
    monkeypatch.setattr(boxes, "fork_program", fork)
    result = await kernel.run_program("print('ran')", timeout_s=20)
    assert result.status is ExecStatus.OK and result.stdout == "ran\n", result
    assert alive == [[]], alive


async def test_a_program_waiting_for_its_source_is_not_dumpable(make_kernel: KernelFactory) -> None:
    """Its /proc files stay root's (no process of its uid can write its memory) until its source
    came; the program it runs then is dumpable, as an exec'd one is."""
    require_root()
    kernel = await make_kernel()
    await kernel.run_program("pass", timeout_s=10)
    waiting = await waiting_program(kernel)
    # (The /proc/<pid> folder shows the euid whatever the flag; its files are root's when undumpable.)
    assert os.stat(f"/proc/{waiting}/environ").st_uid == 0
    seen = await run(kernel, "import os\n_out = {'owner': os.stat('/proc/self/environ').st_uid, 'uid': os.getuid()}")
    assert seen["owner"] == seen["uid"] == kernel._lease.uid, seen  # type: ignore[attr-defined]


async def test_a_program_finds_no_other_programs_pids_in_the_template_s_frames(make_kernel: KernelFactory) -> None:
    """Its frames lead back into the template's code (its own request, the template's command
    line, as /proc/self/cmdline shows): never to the template's children of other episodes."""
    require_root()
    other = await make_kernel()
    await other.run_program("pass", timeout_s=10)
    await waiting_program(other)  # another episode's program, a child of the same template
    kernel = await make_kernel()
    seen = await run(kernel, "import sys\n_f, _out = sys._getframe(), {'exits': []}\nwhile _f is not None:\n"
                             "    if isinstance(_f.f_locals.get('exits'), dict):\n"
                             "        _out['exits'] += list(_f.f_locals['exits'])\n"
                             "    _f = _f.f_back")
    assert seen == {"exits": []}, seen


UVLOOP_RUNS = """
import asyncio, sys, uvloop
sys.path.insert(0, {helpers!r})
from kernel_helpers import test_policy
from sandbox_env.kernels.jupyter.kernel import JupyterKernel

async def main():
    kernel = JupyterKernel(test_policy())
    await kernel.start()
    try:
        for _ in range(5):
            result = await kernel.run_program("print(input() * 3)", stdin=b"ab\\n", timeout_s=20)
            assert result.stdout == "ababab\\n", result
    finally:
        await kernel.close()

with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(main())
"""


def test_on_uvloop_a_program_s_pipes_are_closed_once(tmp_path: Any) -> None:
    """uvicorn serves on uvloop, whose pipe transports closed each descriptor twice (the handle,
    then the file object): a descriptor another thread opened in between (another box's status
    pipe) was closed under its owner, seen as 500s on /run_code under load. The event loop's
    thread, traced, must close no descriptor that is not open."""
    pytest.importorskip("uvloop")
    require_root()
    strace = shutil.which("strace")
    if strace is None:
        missing("strace (apt-get install strace) watches the event loop's closes")
    trace = tmp_path / "closes.txt"
    script = UVLOOP_RUNS.format(helpers=str(Path(__file__).parent))
    # Without -f: the main thread only, where the event loop runs (threads and children close
    # descriptors that are not theirs to check, e.g. a child's sweep of its inherited ones).
    done = subprocess.run([strace, "-qq", "-e", "trace=close", "-e", "status=failed", "-o", str(trace),
                           sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in trace.read_text().splitlines() if "EBADF" in line] == []
