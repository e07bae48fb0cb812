"""The sandbox containers on the daemon: their hardened options and labels, their removal, the
events the daemon logged for one and how it ended, what one holds in memory, and the sweep of
orphans a crashed server left."""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from typing import Any

import docker
import docker.errors
from docker.types import LogConfig, Ulimit

from sandbox_env import languages
from sandbox_env._version import __version__
from sandbox_env.inside.procs import stat_field
from sandbox_env.kernels.docker.daemon import EXECUTOR, get_client, registered_runtimes, runtime_report
from sandbox_env.models import ExecStatus
from sandbox_env.policy import Policy

logger = logging.getLogger(__name__)

OWNER_LABEL, EPISODE_LABEL, POLICY_LABEL = "sandbox-env.owner", "sandbox-env.episode", "sandbox-env.policy"
SERVER_LABEL = "sandbox-env.server"  # "<pid>:<start time>" of the server process that made it
SANDBOX_UID = 10001  # the image's `sandbox` user; never root
SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_UID}"
WORKSPACE = "/workspace"
ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKSPACE, "LANG": "C.UTF-8",
               "TMPDIR": "/tmp"}
MB = 1 << 20
# PID 1's whole program: read one length-prefixed program from stdin (see channel.runner_program), run it.
BOOTSTRAP = ("import os\ndef r(n):\n b=b''\n while len(b)<n:\n  c=os.read(0,n-len(b))\n"
             "  if not c:raise SystemExit(3)\n  b+=c\n return b\n"
             "exec(compile(r(int.from_bytes(r(4),'big')),'<sandbox-boot>','exec'),{'__name__':'__main__'})\n")


def default_image() -> str:
    return f"sandbox-env/python:{__version__}"


def _start_ticks(pid: int) -> str:
    return stat_field(pid, 19)


@functools.lru_cache(maxsize=1)
def server_instance() -> str:
    """This process, unambiguously on this host: pid plus its start time (pids get reused)."""
    return f"{os.getpid()}:{_start_ticks(os.getpid())}"


def _server_alive(instance: str) -> bool:
    pid, _, ticks = instance.partition(":")
    return pid.isdigit() and bool(ticks) and _start_ticks(int(pid)) == ticks


def default_owner() -> str:
    """Stable across restarts of one server (its host name), so a restart finds its orphans."""
    return socket.gethostname()


def container_options(policy: Policy, *, image: str, owner: str, episode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(create_container kwargs, host-config kwargs): the whole hardening in one place."""
    host = _host_options(policy)
    create = _create_options(policy, image=image, owner=owner, episode=episode)
    return create, host


def workspace_exec(policy: Policy) -> str:
    """Docker mounts a tmpfs noexec unless told otherwise: only a compiled language's sandbox
    needs to run what it wrote (its compiler's output, in /workspace); /tmp stays noexec."""
    return "exec" if languages.get(policy.language).compiled else "noexec"


def _host_options(policy: Policy) -> dict[str, Any]:
    file_size = policy.file_size_mb * MB
    host = {
        "network_mode": "bridge" if policy.network else "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={policy.tmp_mb}m",
                  WORKSPACE: f"rw,nosuid,nodev,{workspace_exec(policy)},size={policy.workspace_mb}m,"
                             f"uid={SANDBOX_UID},gid={SANDBOX_UID},mode=0700"},
        "shm_size": min(policy.tmp_mb, 64) * MB,
        "mem_limit": policy.memory_mb * MB,
        "memswap_limit": policy.memory_mb * MB,
        "nano_cpus": int(policy.cpus * 1e9),
        "pids_limit": policy.pids,
        "ulimits": [Ulimit(name="nofile", soft=policy.open_files, hard=policy.open_files),
                    Ulimit(name="fsize", soft=file_size, hard=file_size),
                    Ulimit(name="core", soft=0, hard=0)],
        "init": False,  # the supervisor is PID 1: non-dumpable, unkillable from inside, reaps orphans
        "oom_score_adj": 500,  # if the host runs out of memory, sandboxes go before the server
        "log_config": LogConfig(type="none"),
        "auto_remove": True,  # stdin closes with the server's socket: a crashed server leaves nothing
        "privileged": False,
    }
    if policy.runtime == "auto":
        if "runsc" in registered_runtimes():
            host["runtime"] = "runsc"
    elif policy.runtime:
        host["runtime"] = policy.runtime
    return host


def _create_options(policy: Policy, *, image: str, owner: str, episode: str) -> dict[str, Any]:
    return {
        "image": image,
        "command": ["python3", "-I", "-S", "-c", BOOTSTRAP],
        "user": SANDBOX_USER,
        "working_dir": WORKSPACE,
        "environment": dict(ENVIRONMENT),
        "hostname": "sandbox",
        "labels": {OWNER_LABEL: owner, EPISODE_LABEL: episode, POLICY_LABEL: policy.name,
                   SERVER_LABEL: server_instance()},
        "stdin_open": True,
        "detach": False,  # docker-py's way to ask for StdinOnce: stdin closes when we disconnect
        "tty": False,
        "network_disabled": not policy.network,
        "use_config_proxy": False,  # never copy the server's proxy settings into the sandbox
    }


def container_events(client: docker.DockerClient, container_id: str, since: float) -> list[dict[str, Any]]:
    """The daemon's events for one container since `since` (a kill from outside logs "kill")."""
    stream = client.api.events(since=str(int(since) - 1), until=f"{time.time():.9f}",
                               filters={"container": container_id}, decode=True)
    try:
        return [event for event in stream if isinstance(event, dict)]
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def stopped_from_outside(client: docker.DockerClient, container_id: str, since: float) -> bool:
    """The daemon logged a kill, stop or pause of the container since `since`, or it is paused
    now (only the daemon's clients can pause it: a pause before `since` logs nothing in the
    window), or the daemon cannot say."""
    try:
        events = container_events(client, container_id, since)
        if any(event.get("Action") in ("kill", "stop", "pause") for event in events):
            return True
        return bool(client.api.inspect_container(container_id).get("State", {}).get("Paused"))
    except docker.errors.NotFound:
        return False  # gone with no kill logged: the code brought it down (memory)
    except Exception:  # noqa: BLE001 - the daemon itself is in trouble: infrastructure
        return True


def death_status(client: docker.DockerClient, container_id: str) -> tuple[ExecStatus, int]:
    """How a container ended, as a step's status and exit code."""
    try:
        state = client.api.inspect_container(container_id)["State"]
    except Exception:  # noqa: BLE001 - gone (auto-removed) or daemon trouble: report a plain kill
        return ExecStatus.KILLED, 137
    if state.get("OOMKilled"):
        return ExecStatus.OOM, 137
    return ExecStatus.KILLED, int(state.get("ExitCode") or 137)


# Where a local daemon puts a container's memory cgroup: cgroup v1 and v2, under the cgroupfs and
# the systemd drivers. A remote or rootless daemon's are not in view: then nothing is measured.
MEMORY_CHARGE_FILES = (
    "/sys/fs/cgroup/memory/docker/{id}/memory.usage_in_bytes",
    "/sys/fs/cgroup/memory/system.slice/docker-{id}.scope/memory.usage_in_bytes",
    "/sys/fs/cgroup/docker/{id}/memory.current",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.current",
)


def _first_count(patterns: tuple[str, ...], container_id: str) -> int | None:
    """The number in the first of the container's cgroup files in view (None: none is)."""
    for pattern in patterns:
        try:
            with open(pattern.format(id=container_id), "rb") as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return None


def memory_charge(container_id: str) -> int | None:
    """Bytes the container's memory cgroup is charged (processes, tmpfs, page cache), read from
    the host's cgroup files: no call to the daemon; None where they are not in view."""
    return _first_count(MEMORY_CHARGE_FILES, container_id)


CPU_CHARGE_FILES = (  # (path, field of a flat keyed file or None, unit in seconds)
    ("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage", None, 1e-9),
    ("/sys/fs/cgroup/cpu,cpuacct/docker/{id}/cpuacct.usage", None, 1e-9),
    ("/sys/fs/cgroup/cpuacct/system.slice/docker-{id}.scope/cpuacct.usage", None, 1e-9),
    ("/sys/fs/cgroup/docker/{id}/cpu.stat", b"usage_usec", 1e-6),
    ("/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat", b"usage_usec", 1e-6),
)
PIDS_FILES = (
    "/sys/fs/cgroup/pids/docker/{id}/pids.current",
    "/sys/fs/cgroup/pids/system.slice/docker-{id}.scope/pids.current",
    "/sys/fs/cgroup/docker/{id}/pids.current",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/pids.current",
)


def cpu_charge(container_id: str) -> float | None:
    """CPU seconds the container's processes used, from the host's cgroup files (None: not in view)."""
    for pattern, field, unit in CPU_CHARGE_FILES:
        try:
            with open(pattern.format(id=container_id), "rb") as f:
                data = f.read()
        except OSError:
            continue
        try:
            if field is None:
                return int(data) * unit
            for line in data.splitlines():
                key, _, value = line.partition(b" ")
                if key == field:
                    return int(value) * unit
        except ValueError:
            return None
    return None


def process_count(container_id: str) -> int | None:
    """Processes (tasks) in the container's pids cgroup, from the host's cgroup files."""
    return _first_count(PIDS_FILES, container_id)


def remove_container(client: docker.DockerClient, container_id: str, wait_s: float = 10.0) -> bool:
    """Kill and remove; when the daemon is already auto-removing it, wait until it is gone.
    False when the daemon failed (5xx: say, shutting down) and a later try may succeed;
    connection errors (nothing listening) are raised."""
    try:
        client.api.remove_container(container_id, force=True)
    except docker.errors.NotFound:
        return True
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: a removal is in progress (auto-remove after a kill)
            logger.warning("could not remove container %s: %s", container_id[:12], exc)
            return exc.status_code is not None and exc.status_code < 500
        try:
            client.api.wait(container_id, timeout=wait_s, condition="removed")
        except docker.errors.NotFound:
            return True  # gone before the wait began
        except Exception as exc:  # noqa: BLE001 - a timeout or a daemon in trouble: the sweeps retry
            logger.warning("container %s still being removed: %r", container_id[:12], exc)
            return False
    return True


def cleanup_orphans(owner: str | None = None, client: docker.DockerClient | None = None, *,
                    server: str | None = None, keep_live: bool = False) -> int:
    """Remove containers carrying our labels: everyone's, or `owner`'s, or one `server` process's.

    With `keep_live`, containers whose server process still runs on this host are kept, so a
    server starting next to another one (tests, several workers) never kills its neighbour's
    episodes. Blocking: call it through `asyncio.to_thread` from async code. Returns the count."""
    client = client or get_client()
    labels = [f"{OWNER_LABEL}={owner}" if owner else OWNER_LABEL]
    if server:
        labels.append(f"{SERVER_LABEL}={server}")
    found = client.api.containers(all=True, filters={"label": labels})
    ids = [c["Id"] for c in found
           if not (keep_live and _server_alive((c.get("Labels") or {}).get(SERVER_LABEL, "")))]
    list(EXECUTOR.map(lambda cid: remove_container(client, cid), ids))
    if ids:
        logger.warning("removed %d orphaned sandbox containers (%s)", len(ids), ", ".join(labels))
    return len(ids)


def sweep_and_report() -> dict[str, Any]:
    """At server start: remove this owner's orphans (of servers no longer running), report the
    runtime. Blocking."""
    removed = cleanup_orphans(default_owner(), keep_live=True)
    return {**runtime_report(), "owner": default_owner(), "orphans_removed": removed}
