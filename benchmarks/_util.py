"""Shared helpers for the benchmarks: a server subprocess, medians, and result files."""

from __future__ import annotations

import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The servers started here require a token (auth is on by default): they and sandbox-env's
# clients in this process share this one through the environment.
os.environ.setdefault("SANDBOX_ENV_TOKEN", secrets.token_hex(24))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


class ServerProcess:
    """`sandbox-env serve` in a subprocess; records the time from spawn to a healthy /health."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.port = free_port()
        self.log = log  # where the server's output goes (default: nowhere)
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).parent / "sandbox-env"  # by absolute path: no shim overhead
        self.args = [str(script), "serve", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.token = self.env.get("SANDBOX_ENV_TOKEN") if "--no-auth" not in args else None
        self.headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.cold_start_s = float("nan")

    def __enter__(self) -> ServerProcess:
        start = time.perf_counter()
        sink = self.log.open("ab") if self.log is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=sink, stderr=sink)
        finally:
            if self.log is not None:
                sink.close()  # type: ignore[union-attr]
        deadline = start + 60
        while time.perf_counter() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    self.cold_start_s = time.perf_counter() - start
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        self.__exit__()
        raise RuntimeError("server did not become healthy in 60 s")

    def rss_mb(self) -> float:
        import psutil

        assert self.proc is not None
        return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
