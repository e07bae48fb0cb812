"""Kernels forked from the kernel template (issue #13, item 2): each is as isolated as a kernel
bwrap started itself, and as fresh as a new interpreter where it matters; the template's death
costs no live episode anything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from kernel_helpers import KernelFactory, missing
from test_jupyter_isolation import probe

from sandbox_env.kernels.jupyter import template as template_module
from sandbox_env.kernels.jupyter.template import template
from sandbox_env.models import ExecStatus

pytestmark = pytest.mark.slow
NAMESPACES = ("mnt", "pid", "ipc", "uts", "net", "cgroup")
IDENTITY = """
import os, socket
_st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)
_out = {k: _st[k].strip() for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp', 'Groups')}
_out.update(uid=os.getuid(), gid=os.getgid(), host=socket.gethostname(),
            ns={n: os.stat(f'/proc/self/ns/{n}').st_ino for n in NAMESPACES},
            environ=open('/proc/self/environ', 'rb').read().decode(errors='replace'), env=dict(os.environ))
"""


@pytest.fixture
def backend() -> str:
    return "jupyter"


@pytest.fixture(params=["forked", "exec"])
def start_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(template_module, "FORKING", request.param == "forked")
    return str(request.param)


def forked(kernel: Any) -> bool:
    return kernel._cur is not None and kernel._cur.holder is not None


def require_template() -> None:
    if os.geteuid() != 0:
        missing("the kernel template needs a root server")


async def test_identity_and_namespaces_whichever_way_the_kernel_starts(make_kernel: KernelFactory, start_path: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No capability in any set, no group, no_new_privs, the seccomp filter, a uid of its own, six
    namespaces of its own, and nothing of the server's environment (a canary set before the
    template starts)."""
    require_template()
    monkeypatch.setenv("SBX_SERVER_SECRET", "canary-of-the-server")
    for kind in ("kernel", "relay"):
        template(kind).close()  # started again, with the canary in the server's environment
    kernel = await make_kernel()
    assert forked(kernel) == (start_path == "forked")
    seen = await probe(kernel, IDENTITY, NAMESPACES=NAMESPACES)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(seen[cap], 16) == 0, (cap, seen[cap])
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2" and seen["Groups"] == "", seen
    assert seen["uid"] not in (0, os.getuid()) and seen["gid"] not in (0, os.getgid()), seen
    assert seen["host"] == "sandbox"
    ours = {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in NAMESPACES}
    assert all(seen["ns"][n] != ours[n] for n in NAMESPACES), (seen["ns"], ours)
    assert "canary-of-the-server" not in seen["environ"] + repr(seen["env"])
    assert seen["env"]["HOME"] == str(kernel.workdir) and "SANDBOX_ENV_KERNEL" in seen["env"]


async def test_forked_kernels_do_not_share_random_state(make_kernel: KernelFactory) -> None:
    require_template()
    first, second = await make_kernel(), await make_kernel()
    assert forked(first) and forked(second)
    code = "import random\n_out = [random.random() for _ in range(4)]"
    assert await probe(first, code) != await probe(second, code)


async def test_a_module_written_in_the_workspace_imports(make_kernel: KernelFactory) -> None:
    """As under `python -m ipykernel_launcher`, the working folder is the first import path."""
    kernel = await make_kernel()
    result = await kernel.execute("open('helper_mod.py', 'w').write('VALUE = 41')\nimport helper_mod\n"
                                  "print(helper_mod.VALUE + 1)")
    assert result.status is ExecStatus.OK and result.stdout.strip() == "42", result


async def test_the_templates_death_costs_live_kernels_nothing(make_kernel: KernelFactory) -> None:
    """Killed between two steps of a kernel it forked: that kernel keeps its state and answers,
    its death is still seen (the first child writes the status), and the next kernel comes from a
    new template."""
    require_template()
    first = await make_kernel()
    assert forked(first)
    assert (await first.execute("x = 41")).status is ExecStatus.OK
    old = template("kernel")._proc
    assert old is not None
    old.send_signal(signal.SIGKILL)
    old.wait()
    assert (await first.execute("print(x + 1)")).stdout.strip() == "42"
    second = await make_kernel()
    assert forked(second) and template("kernel")._proc is not None and template("kernel")._proc.pid != old.pid
    assert (await second.execute("print('y' in globals())")).stdout.strip() == "False"
    lost = await first.execute("import os; os.kill(os.getpid(), 9)")
    assert lost.status is ExecStatus.KILLED, lost
    assert (await first.execute("print('x' in globals())")).stdout.strip() == "False"


def at_random(pid: int) -> bytes:
    """The 16 random bytes the kernel gave the process at exec (its stack canary and pointer guard
    come from them): shared by whatever was forked from the same exec."""
    auxv = Path(f"/proc/{pid}/auxv").read_bytes()
    pairs = struct.iter_unpack("QQ", auxv)
    address = next(value for key, value in pairs if key == 25)  # AT_RANDOM
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return mem.read(16)


async def test_a_relay_shares_no_secret_of_its_process_with_the_kernel_it_serves(make_kernel: KernelFactory) -> None:
    """The kernel can read its own canary and layout; its relay parses what it sends outside the
    sandbox: they come from different templates."""
    require_template()
    kernel = await make_kernel()
    cur = kernel._cur  # type: ignore[attr-defined]
    assert forked(kernel) and cur.relay is not None
    pids = cur.conf.pids() - {cur.relay.pid}
    kernel_pid = next(p for p in pids if Path(f"/proc/{p}/comm").read_text().strip().startswith("python"))
    assert at_random(cur.relay.pid) != at_random(kernel_pid)


async def test_a_start_cancelled_while_it_forks_sends_the_template_nothing_stale(make_kernel: KernelFactory) -> None:
    """Cancelled while its request waits for the template, with the descriptors it meant to send
    closed and their numbers reused by the server: the template forks nothing wrong, survives, and
    the child forked for nobody is gone."""
    require_template()
    running = await make_kernel()  # the templates run
    kernel_template = template("kernel")
    before = kernel_template._proc
    assert before is not None
    kernel_template._lock.acquire()  # the template is busy with someone else's request
    reused: list[int] = []
    try:
        start = asyncio.ensure_future(make_kernel())
        deadline = time.monotonic() + 30
        while not any(p.info["name"] == "sleep" and "infinity" in (p.info["cmdline"] or [])
                      for p in psutil.Process().children(recursive=True)
                      for p.info in [p.as_dict(["name", "cmdline"])]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the sandbox is built: the start now waits for the template
        await asyncio.sleep(0.1)
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
        reused = [os.open("/etc/hostname", os.O_RDONLY) for _ in range(8)]
    finally:
        kernel_template._lock.release()
    try:
        await asyncio.sleep(1.0)
        assert kernel_template._proc is before and before.poll() is None, "the template died"
        forked_left = [p for p in psutil.Process(before.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        running_child = running._cur.proc.pid  # type: ignore[attr-defined]
        assert [p.pid for p in forked_left if p.pid != running_child] == [], \
            "a child forked for a cancelled start lives on"
        fresh = await make_kernel()
        assert (await fresh.execute("print(6 * 7)")).stdout.strip() == "42"
    finally:
        for fd in reused:
            os.close(fd)


async def test_a_status_pipe_closed_early_never_ends_the_template() -> None:
    require_template()
    kernel_template = template("kernel")
    nobody = await kernel_template.fork({"op": "nothing"}, [])  # an unknown op: the child just exits
    nobody.close()  # the server stops listening before the template reaps it
    await asyncio.sleep(0.5)
    proc = kernel_template._proc
    assert proc is not None and proc.poll() is None, "the template died"
    again = await kernel_template.fork({"op": "nothing"}, [])
    assert again.wait(10) == 72


async def test_closing_a_kernel_leaves_no_process_of_it_anywhere(make_kernel: KernelFactory) -> None:
    """Not even a zombie under the host's init: whoever reaps the kernel, it is done by the time
    close() returns and the uid may go to another episode."""
    require_template()
    kernel = await make_kernel()
    assert forked(kernel)
    uid = kernel._lease.uid  # type: ignore[attr-defined]
    assert any(psutil.Process(p).uids().real == uid for p in kernel._cur.conf.pids())  # type: ignore[attr-defined]
    await kernel.close()
    left = [p.info for p in psutil.process_iter(["pid", "name", "status", "uids"]) if p.info["uids"].real == uid]
    assert left == [], left
