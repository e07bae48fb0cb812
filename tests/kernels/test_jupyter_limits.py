"""Jupyter backend specifics: the confinement mechanisms themselves, and the failure paths."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
from kernel_helpers import (
    KernelFactory,
    processes_with,
    test_policy,
    token,
    wait_gone,
    wait_present,
)

from sandbox_env.kernels.jupyter import limits, workdirs
from sandbox_env.kernels.jupyter.cgroups import cgroup_layout
from sandbox_env.kernels.jupyter.config import JupyterConfig
from sandbox_env.kernels.jupyter.kernel import KERNEL_FDS, KERNEL_TASKS, JupyterKernel
from sandbox_env.kernels.jupyter.limits import MB
from sandbox_env.kernels.jupyter.process import RELAY_TASKS
from sandbox_env.models import ExecStatus

needs_cgroups = pytest.mark.skipif(cgroup_layout()[0] == "none", reason="no writable cgroups here")


@pytest.fixture
def backend() -> str:
    """These tests read the jupyter backend's own confinement: `make_kernel` starts JupyterKernels."""
    return "jupyter"


@needs_cgroups
async def test_cgroups_written_and_removed(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(memory_mb=200, pids=40, cpus=0.5)
    assert kernel._cur is not None
    conf, pid = kernel._cur.conf, kernel._cur.proc.pid  # type: ignore[union-attr]
    assert conf.mechanism.startswith("cgroup-")
    dirs = dict(conf.dirs)
    if conf.version == "v1":
        memory = dirs["memory"]
        assert int((memory / "memory.limit_in_bytes").read_text()) == 200 * MB
        if (memory / "memory.memsw.limit_in_bytes").exists():
            assert int((memory / "memory.memsw.limit_in_bytes").read_text()) == 200 * MB
        assert int((dirs["pids"] / "pids.max").read_text()) == 40 + KERNEL_TASKS + RELAY_TASKS
        assert int((dirs["cpu"] / "cpu.cfs_quota_us").read_text()) == 50_000
        inner = int((await kernel.execute("import os; print(os.getpid())")).stdout)
        interpreter = next(p for p in conf.pids()  # the host pid of the kernel's interpreter
                           if Path(f"/proc/{p}/status").read_text().split("NSpid:")[1].split("\n")[0].split()[-1]
                           == str(inner))
        for d in dirs.values():
            assert str(interpreter) in (d / "cgroup.procs").read_text().split()
    info = await kernel.inspect()
    assert info["limits"] == conf.mechanism and info["pid"] == pid
    root = kernel.root
    await kernel.close()
    assert not any(d.exists() for d in dirs.values())
    assert root is not None and not root.exists()


async def test_rlimits_inside_kernel(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(file_size_mb=5, open_files=200, cpu_time_s=100)
    code = "import resource as r\nprint([r.getrlimit(x)[0] for x in (r.RLIMIT_FSIZE, r.RLIMIT_NOFILE, r.RLIMIT_CPU, r.RLIMIT_CORE)])"
    result = await kernel.execute(code)
    assert result.stdout.strip() == str([5 * MB, 200 + KERNEL_FDS, 100, 0])


async def test_file_size_limit(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(file_size_mb=1)
    result = await kernel.execute("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (3 << 20))")
    assert result.status is ExecStatus.ERROR
    assert result.exception is not None and result.exception.type == "OSError"
    assert (await kernel.execute("print('alive')")).stdout == "alive\n"


async def test_cpu_time_limit_kills(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(cpu_time_s=2, timeout_s=30)
    result = await kernel.execute("while True:\n    pass")
    assert result.status is ExecStatus.KILLED
    assert (await kernel.execute("print('fresh')")).stdout.endswith("fresh\n")


@needs_cgroups
async def test_memory_hog_is_oom(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(memory_mb=200, timeout_s=20)
    result = await kernel.execute("hog = []\nwhile True:\n    hog.append(b'x' * 10_000_000)")
    assert result.status is ExecStatus.OOM
    assert result.exit_code == 137
    assert (await kernel.execute("print('hog' in globals())")).stdout.endswith("False\n")


async def test_peak_memory_and_cpu_reported(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(memory_mb=512)
    result = await kernel.execute("blob = b'x' * (150 << 20)\nn = sum(range(3_000_000))")
    assert result.status is ExecStatus.OK
    assert result.peak_memory_mb is not None and result.peak_memory_mb >= 150
    assert result.cpu_time_s is not None and result.cpu_time_s > 0.01
    small = await kernel.execute("del blob")
    assert small.peak_memory_mb is not None and small.peak_memory_mb < result.peak_memory_mb + 50


@needs_cgroups
async def test_fork_bomb_in_child_contained(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(pids=24, timeout_s=5)
    tok = token()
    code = (
        "import subprocess, sys\n"
        "bomb = 'import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass'\n"
        f"subprocess.Popen([sys.executable, '-c', bomb, {tok!r}])\n"
        "print('launched')"
    )
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OK
    await asyncio.sleep(1.0)
    assert kernel._cur is not None
    assert len(kernel._cur.conf.pids()) <= 24 + KERNEL_TASKS + RELAY_TASKS
    assert len(processes_with(tok)) <= 24 + KERNEL_TASKS + RELAY_TASKS
    await kernel.close()
    assert wait_gone(tok) == []


async def test_grandchild_holding_output_does_not_block(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=10)
    tok = token()
    started = time.monotonic()
    result = await kernel.execute(f"import subprocess\np = subprocess.Popen([{tok!r}, '300'], executable='/bin/sleep')")
    assert result.status is ExecStatus.OK
    assert time.monotonic() - started < 5
    assert (await kernel.execute("print(p.poll())")).stdout == "None\n"
    await kernel.close()
    assert wait_gone(tok) == []


async def test_close_during_execute(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=60)
    task = asyncio.create_task(kernel.execute("while True:\n    pass"))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await kernel.close()
    result = await asyncio.wait_for(task, 10)
    assert result.status is ExecStatus.KILLED
    assert time.monotonic() - started < 10
    assert not kernel.is_alive()


async def test_cancelled_step_does_not_run_on(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=60)
    task = asyncio.create_task(kernel.execute("import time\nwhile True:\n    time.sleep(0.01)"))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    result = await kernel.execute("print('next')")
    assert result.status is ExecStatus.OK and result.stdout.endswith("next\n")


async def test_died_between_steps(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    code = "import os, threading, time\nthreading.Thread(target=lambda: (time.sleep(0.3), os._exit(1))).start()"
    assert (await kernel.execute(code)).status is ExecStatus.OK
    await asyncio.sleep(1.0)
    result = await kernel.execute("print('again')")
    assert result.status is ExecStatus.OK and result.stdout == "again\n"
    assert "died" in result.stderr


async def test_inspect_variables(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    await kernel.execute("import os\nx = 41\nname = 'abc' * 100\n_hidden = 1\ndef f():\n    pass")
    info = await kernel.inspect()
    names = {v["name"]: v for v in info["variables"]}
    assert set(names) == {"x", "name", "f"}
    assert names["x"]["type"] == "int" and names["x"]["repr"] == "41"
    assert len(names["name"]["repr"]) < 100
    assert info["pid"] and info["memory_mb"] and info["memory_mb"] > 10


async def test_event_loop_stays_responsive(make_kernel: KernelFactory) -> None:
    kernels = [await make_kernel(timeout_s=2, output_limit_bytes=4_000_000) for _ in range(4)]
    codes = ["while True:\n    pass"] * 3 + ["while True:\n    print('z' * 100_000)"]
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            worst = max(worst, time.monotonic() - before - 0.05)

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(*(k.execute(c) for k, c in zip(kernels, codes)))
    tick.cancel()
    assert [r.status for r in results] == [ExecStatus.TIMEOUT] * 3 + [ExecStatus.OUTPUT_LIMIT]
    assert worst < 1.0


async def test_rlimit_fallback(make_kernel: KernelFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(JupyterKernel, "use_cgroups", False)
    kernel = await make_kernel(memory_mb=300, timeout_s=20)
    info = await kernel.inspect()
    assert info["limits"].startswith("rlimit")  # no cgroups
    limit = await kernel.execute("import resource\nprint(resource.getrlimit(resource.RLIMIT_DATA)[0])")
    assert int(limit.stdout) == 300 * MB
    hog = await kernel.execute("hog = []\nwhile True:\n    hog.append(b'x' * 10_000_000)")
    assert hog.status in (ExecStatus.ERROR, ExecStatus.OOM, ExecStatus.KILLED)
    tok = token()
    code = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(300)', {tok!r}])\n"
        "    os._exit(0)\n"
        "os.wait()"
    )
    assert (await kernel.execute(code)).status is ExecStatus.OK
    assert wait_present(tok)
    await kernel.close()
    assert wait_gone(tok) == []


@needs_cgroups
async def test_child_oom_reported_kernel_kept(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(memory_mb=200, timeout_s=20)
    await kernel.execute("kept = 1")
    code = ("import subprocess, sys\n"
            "hog = 'h = []\\nwhile True:\\n    h.append(bytearray(10_000_000))'\n"
            "print(subprocess.run([sys.executable, '-c', hog]).returncode)")
    result = await kernel.execute(code)
    assert result.status is ExecStatus.OOM
    assert result.stdout.strip() == "-9"
    assert (await kernel.execute("print(kept)")).stdout == "1\n"


@needs_cgroups
def test_sweep_removes_cgroups_of_dead_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    dead_pid = next(p for p in range(4_194_000, 4_194_300) if not os.path.exists(f"/proc/{p}"))
    tok = token()
    dirs = [parent / f"{dead_pid}-{tok[-12:]}-1" for parent in cgroup_layout()[1].values()]
    proc = subprocess.Popen([tok, "300"], executable="/bin/sleep")
    try:
        for d in dirs:
            d.mkdir(parents=True)
            (d / "cgroup.procs").write_text(str(proc.pid))
        monkeypatch.setattr(limits, "_swept", False)
        limits.sweep_stale()
        assert proc.wait(timeout=5) == -9
        assert not any(d.exists() for d in dirs)
    finally:
        proc.kill()
        proc.wait()
        for d in dirs:
            if d.exists():
                d.rmdir()


async def test_restart_after_workdir_deleted(tmp_path: Path) -> None:
    kernel = JupyterKernel(test_policy(), JupyterConfig(workdir_root=str(tmp_path / "episodes")))
    await kernel.start()
    try:
        assert kernel.root is not None and kernel.root.parent == tmp_path / "episodes"
        await kernel.execute("import os, shutil\nos.chdir('/')\nshutil.rmtree(os.environ['HOME'])")
        assert (await kernel.execute("import os\nos._exit(1)")).status is ExecStatus.ERROR
        result = await kernel.execute("import os\nprint(os.getcwd() == os.environ['HOME'])")
        assert result.stdout == "True\n"
    finally:
        await kernel.close()
    assert not kernel.root.exists()


async def test_no_network_when_policy_says_so(make_kernel: KernelFactory) -> None:
    code = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=2)\n"
            "except OSError as exc:\n    print(type(exc).__name__, exc.errno)")
    closed = await make_kernel(network=False)
    info = await closed.inspect()
    if "+netns" not in info["limits"]:
        pytest.skip("network namespaces need root")
    result = await closed.execute(code)
    assert result.stdout.strip() == "OSError 101"  # ENETUNREACH: not even loopback
    opened = await make_kernel(network=True)
    assert "+netns" not in (await opened.inspect())["limits"]
    assert (await opened.execute(code)).stdout.strip() == "ConnectionRefusedError 111"


async def test_sweeps_workdirs_of_dead_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead_pid = next(p for p in range(4_194_000, 4_194_300) if not os.path.exists(f"/proc/{p}"))
    stale = tmp_path / f"sandbox-env-{dead_pid}-abc"
    live = tmp_path / f"sandbox-env-{os.getpid()}-def"
    for d in (stale, live):
        (d / "work").mkdir(parents=True)
    monkeypatch.setattr(workdirs, "swept_roots", set())
    kernel = JupyterKernel(test_policy(), JupyterConfig(workdir_root=str(tmp_path)))
    await kernel.start()
    try:
        assert not stale.exists() and live.exists()
    finally:
        await kernel.close()


async def test_memory_bytes_is_the_confinements_charge(make_kernel: KernelFactory) -> None:
    """What the pool weighs a ready kernel with: its cgroup's charge (else the kernel's RSS)."""
    kernel = await make_kernel(memory_mb=256)
    idle = await kernel.memory_bytes()
    assert idle is not None and 0 < idle < 256 * MB, idle
    held = await kernel.execute("block = bytearray(64 << 20)")
    assert held.status == ExecStatus.OK, held
    assert (await kernel.memory_bytes() or 0) >= idle + 48 * MB
    await kernel.close()
    assert await kernel.memory_bytes() is None
