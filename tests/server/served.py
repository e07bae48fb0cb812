"""Real `sandbox-env serve` processes for the lifecycle and fault tests (signals need a process of
its own), and small helpers for raw `/ws` frames and bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DAEMON_MARK = "86123"  # `sleep 86123`: a daemon an episode leaves behind, easy to find in /proc


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {os.environ['SANDBOX_ENV_TOKEN']}"}

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"


@contextlib.contextmanager
def serve(tmp_path: Path, backend: str, **settings: str) -> Iterator[Served]:
    """`sandbox-env serve` on loopback in a subprocess (the token comes from SANDBOX_ENV_TOKEN)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "SANDBOX_ENV_BACKEND": backend,
           **{f"SANDBOX_ENV_{k.upper()}": v for k, v in settings.items()}}
    log = tmp_path / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "sandbox_env.cli", "serve", "--port", str(port)],
                                   cwd=tmp_path, env=env, stdout=sink, stderr=sink)
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{served.url}/health", timeout=2).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGINT)  # the second one skips the drain
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def ask(ws: Any, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(frame))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 120))
    return reply


async def wait_for(predicate: Callable[[], Awaitable[bool]], what: str, bound_s: float = 60.0) -> None:
    deadline = time.monotonic() + bound_s
    while not await predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


def leftovers(pid: int) -> list[str]:
    """Everything that still names the server `pid`: containers, cgroups, work dirs, daemons."""
    found: list[str] = []
    try:
        import docker

        client = docker.from_env(timeout=30)
        for container in client.api.containers(all=True, filters={"label": "sandbox-env.server"}):
            if str(container["Labels"].get("sandbox-env.server", "")).startswith(f"{pid}:"):
                found.append(f"container {container['Id'][:12]}")
    except Exception:  # noqa: BLE001 - no engine here: nothing of ours can run in one
        pass
    from sandbox_env.kernels.jupyter.cgroups import cgroup_layout

    for parent in cgroup_layout()[1].values():
        found += [f"cgroup {d}" for d in (parent.glob(f"{pid}-*") if parent.is_dir() else [])]
    found += [f"workdir {d}" for d in Path(tempfile.gettempdir()).glob(f"sandbox-env-{pid}-*")]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if cmdline[:2] == [b"sleep", DAEMON_MARK.encode()]:
                    found.append(f"process {entry} (sleep {DAEMON_MARK})")
                if any(arg.startswith(b'{"server": %d,' % pid) for arg in cmdline):
                    found.append(f"process {entry} (forked from the server's kernel template)")
    return found
