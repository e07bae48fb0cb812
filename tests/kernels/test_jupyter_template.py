"""Kernels forked from the kernel template (issue #13, item 2): each is as isolated as a kernel
bwrap started itself, and as fresh as a new interpreter where it matters; the template's death
costs no live episode anything."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from kernel_helpers import KernelFactory, missing
from test_jupyter_isolation import probe

from sandbox_env.kernels.jupyter import process
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
    monkeypatch.setattr(process, "FORKING", request.param == "forked")
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
    template().close()  # started again, with the canary in the server's environment
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
    old = template()._proc
    assert old is not None
    old.send_signal(signal.SIGKILL)
    old.wait()
    assert (await first.execute("print(x + 1)")).stdout.strip() == "42"
    second = await make_kernel()
    assert forked(second) and template()._proc is not None and template()._proc.pid != old.pid
    assert (await second.execute("print('y' in globals())")).stdout.strip() == "False"
    lost = await first.execute("import os; os.kill(os.getpid(), 9)")
    assert lost.status is ExecStatus.KILLED, lost
    assert (await first.execute("print('x' in globals())")).stdout.strip() == "False"
