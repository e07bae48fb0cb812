"""Real farms for the tests: compose.yaml under docker-compose, and the same file on a one-node Swarm.

Each farm gets its own project or stack name, free ports, and a fresh token in its own env file;
when it goes, what it leaves on the engine is counted (sandbox containers of its replicas, its
containers, networks and volumes) and must be nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILES = (REPO / "compose.yaml", REPO / "compose.monitoring.yaml")
READY_DEADLINE_S = 180.0
GONE_DEADLINE_S = 120.0
REPLICAS = 2


def missing(reason: str) -> None:
    """Skip a test whose requirement is missing here; in CI (CI=true) that is a failure."""
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Farm:
    """A running farm: its one URL, its token, and how to reach its replicas' containers."""

    kind: str  # "compose" | "swarm"
    name: str  # compose project or stack
    url: str
    token: str
    prometheus_url: str
    env: dict[str, str]
    replica_names: set[str] = field(default_factory=set)  # every replica seen: their sandboxes must go too

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=30, trust_env=False, **kwargs)

    def replicas(self) -> list[dict[str, Any]]:
        """The farm's replicas as the gateway's /episodes lists them (remembered for the clean-up check)."""
        lines: list[dict[str, Any]] = self.get("/episodes").json()["replicas"]
        self.replica_names |= {line["replica"] for line in lines}
        return lines

    def server_containers(self) -> list[str]:
        """Ids of the server replicas' containers, from the engine's labels."""
        label = (f"com.docker.compose.project={self.name}" if self.kind == "compose"
                 else f"com.docker.stack.namespace={self.name}")
        ids = docker("ps", "-q", "--no-trunc", "--filter", f"label={label}").split()
        servers = []
        for cid in ids:
            image = docker("inspect", "-f", "{{.Config.Image}}", cid).strip()
            if image.startswith("sandbox-env/server"):
                servers.append(cid)
        return servers

    def wait_ready(self, replicas: int = REPLICAS) -> None:
        """Until the farm lists `replicas` replicas, all ready, and the gateway has sent a request
        to each (its view lags the replicas' own by a DNS hold and a check)."""
        deadline = time.monotonic() + READY_DEADLINE_S
        last: Any = None
        names: set[str] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                lines = self.replicas()
                last = lines
                if len(lines) == replicas and all(line["status"] == "ready" for line in lines):
                    names = {line["replica"] for line in lines}
                    break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the farm did not come up with {replicas} ready replicas: {last}")
        seen: set[str] = set()
        while time.monotonic() < deadline and not names <= seen:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                seen.add(self.get("/farm/replica").json()["replica"])
            time.sleep(0.1)
        if not names <= seen:
            raise AssertionError(f"the gateway sent requests to {seen} only, of {names}")


def docker(*argv: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(["docker", *argv], capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(argv)} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def compose_command() -> list[str] | None:
    """docker-compose 1.29 (Debian's), else Compose v2 as `docker compose`."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    return None


def farm_env(tmp: Path) -> tuple[dict[str, str], str]:
    """The variables compose.yaml reads, with a fresh token in its own env file and free ports."""
    token = secrets.token_hex(24)
    env_file = tmp / "farm.env"
    env_file.write_text(f"SANDBOX_ENV_TOKEN={token}\n")
    env_file.chmod(0o600)
    port = free_port()
    env = {**os.environ, "SANDBOX_FARM_ENV_FILE": str(env_file), "SANDBOX_FARM_PORT": str(port),
           "SANDBOX_FARM_PROMETHEUS_PORT": str(free_port()), "SANDBOX_FARM_URL": f"http://127.0.0.1:{port}",
           "SANDBOX_FARM_REPLICAS": str(REPLICAS)}
    return env, token


@contextlib.contextmanager
def compose_farm(tmp: Path) -> Iterator[Farm]:
    command = compose_command()
    assert command is not None
    env, token = farm_env(tmp)
    project = f"sbxfarm{os.getpid()}"
    files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
    base = [*command, "-p", project, *files]
    farm = Farm("compose", project, env["SANDBOX_FARM_URL"], token,
                f"http://127.0.0.1:{env['SANDBOX_FARM_PROMETHEUS_PORT']}", env)
    try:
        run(base + ["up", "-d"], env)
        farm.wait_ready()
        yield farm
    finally:
        with contextlib.suppress(Exception):
            farm.replicas()
        run(base + ["down", "-v", "--remove-orphans", "--timeout", "60"], env, check=False)  # compose.yaml's grace
        assert_nothing_left(farm)


@contextlib.contextmanager
def swarm_farm(tmp: Path) -> Iterator[Farm]:
    """`docker stack deploy` of the same files on this engine's Swarm: initialised here (and left
    at the end) unless the engine is in one already."""
    state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()
    had_gwbridge = bool(docker("network", "ls", "-q", "--filter", "name=^docker_gwbridge$").strip())
    initialised = False
    env, token = farm_env(tmp)
    stack = f"sbxfarm{os.getpid()}"
    farm = Farm("swarm", stack, env["SANDBOX_FARM_URL"], token,
                f"http://127.0.0.1:{env['SANDBOX_FARM_PROMETHEUS_PORT']}", env)
    try:
        if state != "active":
            docker("swarm", "init", "--advertise-addr", "127.0.0.1")
            initialised = True
        files = [arg for path in COMPOSE_FILES for arg in ("-c", str(path))]
        run(["docker", "stack", "deploy", *files, stack], env)
        farm.wait_ready()
        yield farm
    finally:
        with contextlib.suppress(Exception):
            farm.replicas()
        # What Swarm did to the tasks (a replaced replica says why), shown with a failure.
        print(docker("stack", "ps", "--no-trunc", "--format", "{{.Name}} {{.CurrentState}} {{.Error}}", stack, check=False))
        run(["docker", "stack", "rm", stack], env, check=False)
        try:
            assert_nothing_left(farm)
        finally:
            if initialised:
                docker("swarm", "leave", "--force", check=False)
                if not had_gwbridge:  # made by `swarm init` for host-mode ports: ours to remove
                    docker("network", "rm", "docker_gwbridge", check=False)


def run(argv: list[str], env: dict[str, str], check: bool = True) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-3000:]}")


def leftovers(farm: Farm) -> dict[str, list[str]]:
    label = (f"com.docker.compose.project={farm.name}" if farm.kind == "compose"
             else f"com.docker.stack.namespace={farm.name}")
    sandboxes = [line for line in docker("ps", "-a", "--filter", "label=sandbox-env.owner",
                                         "--format", "{{.ID}} {{.Label \"sandbox-env.owner\"}}").splitlines()
                 if line.split(" ", 1)[-1] in farm.replica_names]
    return {
        "containers": docker("ps", "-aq", "--filter", f"label={label}").split(),
        "sandboxes": sandboxes,
        "networks": docker("network", "ls", "-q", "--filter", f"label={label}").split(),
        "volumes": docker("volume", "ls", "-q", "--filter", f"label={label}").split(),
    }


def assert_nothing_left(farm: Farm) -> None:
    """Removal is asynchronous (a stack's tasks, a drained replica's sandboxes): wait, bounded."""
    deadline = time.monotonic() + GONE_DEADLINE_S
    while True:
        left = leftovers(farm)
        if not any(left.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the {farm.kind} farm {farm.name} left {left}")
        time.sleep(1)
