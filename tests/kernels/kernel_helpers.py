"""Helpers shared by the kernel test modules: small policies and leaked-process checks."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
import pytest

from sandbox_env.kernels.base import Kernel
from sandbox_env.policy import Policy

KernelFactory = Callable[..., Awaitable[Kernel]]


def test_policy(**overrides: Any) -> Policy:
    """Small limits so every limit test is quick."""
    fields: dict[str, Any] = {
        "name": "test", "timeout_s": 3, "memory_mb": 256, "pids": 32, "cpus": 1.0, "open_files": 256,
        "file_size_mb": 16, "output_bytes": 16_384, "output_limit_bytes": 2_000_000,
        "interrupt_grace_s": 1.0,
    }
    fields.update(overrides)
    return Policy(**fields)


test_policy.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def missing(reason: str) -> None:
    """Skip a test whose requirement is missing here; in CI (CI=true) that is a failure."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def token() -> str:
    return f"sbxtok{uuid.uuid4().hex}"


def processes_with(needle: str) -> list[psutil.Process]:
    """Live processes whose command line contains `needle` (zombies do not count)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with_needle = needle in " ".join(proc.info["cmdline"] or [])
        if with_needle and proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
            found.append(proc)
    return found


def wait_gone(needle: str, timeout_s: float = 5.0) -> list[psutil.Process]:
    """Processes carrying `needle` still alive after `timeout_s` (reparenting/reaping takes a moment)."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_with(needle)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left




def jupyter_leftovers(kernel: Kernel) -> list[str]:
    """Cgroups and directories a closed JupyterKernel left behind (empty for other backends)."""
    kernel_id, root = getattr(kernel, "id", None), getattr(kernel, "root", None)
    if kernel.name != "jupyter" or kernel_id is None:
        return []
    from sandbox_env.kernels.jupyter.cgroups import cgroup_layout

    left = [str(p) for parent in cgroup_layout()[1].values() for p in parent.glob(f"*-{kernel_id}-*")]
    if root is not None and os.path.exists(root):
        left.append(str(root))
    return left


def wait_present(needle: str, timeout_s: float = 5.0) -> list[psutil.Process]:
    """Processes carrying `needle`, waiting for them to appear (an exec takes a moment)."""
    deadline = time.monotonic() + timeout_s
    while not (found := processes_with(needle)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found

