"""The Docker daemon as the backend sees it: the docker-py client, the thread pool its blocking
calls run in (the event loop never blocks), what the engine enforces, and how to wait for a
daemon that is restarting."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors

from sandbox_env.errors import KernelUnavailableError

logger = logging.getLogger(__name__)
T = TypeVar("T")

DAEMON_WAIT_S = 30.0  # a daemon restarting (stop: 10-15 s, start: a few s), under a client's 60 s reply wait
EXECUTOR = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sandbox-docker")


@functools.lru_cache(maxsize=1)
def get_client() -> docker.DockerClient:
    """The process-wide docker-py client; DOCKER_HOST and friends are docker-py's business."""
    try:
        return docker.from_env(max_pool_size=32, timeout=120)
    except docker.errors.DockerException as exc:
        raise KernelUnavailableError(f"Docker engine unreachable: {exc}") from exc


async def call_in_pool(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(EXECUTOR, functools.partial(fn, *args, **kwargs))


@functools.lru_cache(maxsize=1)
def registered_runtimes() -> frozenset[str]:
    """Runtimes the daemon knows (asked once: a daemon gains runtimes only on restart)."""
    try:
        return frozenset((get_client().info().get("Runtimes") or {}).keys())
    except (docker.errors.DockerException, KernelUnavailableError):
        return frozenset()


def backoff(first_s: float) -> Iterator[float | None]:
    """The pauses between tries of something the daemon must answer: doubling from `first_s` up
    to 2 s while they fit in DAEMON_WAIT_S, then None: the last try."""
    deadline, delay = time.monotonic() + DAEMON_WAIT_S, first_s
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(2 * delay, 2.0)
    yield None


def daemon_unreachable(exc: BaseException) -> bool:
    """The connection to the daemon was refused or its unix socket is gone: nothing reached it.
    docker-py raises requests' ConnectionError around urllib3's error around the OSError."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        error = stack.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, (ConnectionRefusedError, FileNotFoundError)):
            return True
        stack += [*error.args, error.__cause__, error.__context__, getattr(error, "reason", None)]
    return False


def runtime_report(client: docker.DockerClient | None = None) -> dict[str, Any]:
    """What the engine enforces (cgroup version, seccomp, user namespaces, gVisor); logs weak spots."""
    client = client or get_client()
    info = client.info()
    options = " ".join(info.get("SecurityOptions") or [])
    runtimes = sorted(info.get("Runtimes") or {})
    runc = str((info.get("RuncCommit") or {}).get("ID") or "")
    report: dict[str, Any] = {
        "server_version": info.get("ServerVersion"),
        "kernel_version": info.get("KernelVersion"),
        "cgroup_version": str(info.get("CgroupVersion") or "1"),
        "cgroup_driver": info.get("CgroupDriver"),
        "seccomp": "name=seccomp" in options,
        "apparmor": "name=apparmor" in options,
        "selinux": "name=selinux" in options,
        "userns": "name=userns" in options,
        "rootless": "name=rootless" in options,
        "runtimes": runtimes,
        "default_runtime": info.get("DefaultRuntime"),
        "runsc_available": "runsc" in runtimes,
        "runc_commit": runc,
        "warnings": [],
    }
    weak = report["warnings"]
    if not report["seccomp"]:
        weak.append("seccomp is off: containers reach the whole syscall surface")
    if not (report["userns"] or report["rootless"]):
        weak.append("no user namespaces: the sandbox uid is a host uid (kept non-root, caps dropped)")
    if report["cgroup_version"] == "1":
        weak.append("cgroup v1: no cgroup.kill and no per-step memory peak reset; the runner kills by pid")
    if not report["runsc_available"]:
        weak.append("gVisor (runsc) is not installed: isolation rests on the host kernel (runc)")
    for line in weak:
        logger.warning("docker runtime: %s", line)
    return report
