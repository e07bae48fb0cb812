"""Docker backend: one hardened container per episode, a supervisor spoken to over the attach socket.

The container's command is a tiny `python3 -c` bootstrap, run as PID 1, that reads the supervisor
(a bundle of `sandbox_env.inside`) from stdin, so the image needs only python3. Frames are
length-prefixed JSON on the container's stdin/stdout; no network, no `docker exec`. After start-up
every frame is authenticated with a key made for this container (`inside.wire`), carries the id of
the request it answers, and comes in sequence; anything else is an anomaly, and the container is
removed at once and never used again (the request becomes a retryable infrastructure error).
docker-py is synchronous, so every API call runs in a small thread pool and the attach socket is
handed to asyncio: the event loop never blocks. The container is removed with `remove(force=True)`;
a step the supervisor cannot answer in time costs the episode its container, which is replaced by
a fresh one (empty namespace) before the next step.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors
from docker.types import LogConfig, Ulimit
from pydantic import ValidationError

from sandbox_env._version import __version__
from sandbox_env.errors import (
    KernelDiedError,
    KernelError,
    KernelStartError,
    KernelUnavailableError,
)
from sandbox_env.inside import bundle
from sandbox_env.inside.wire import HEADER, KEY_SIZE, MAX_FRAME, TAG_SIZE, TO_SANDBOX, TO_SERVER, Anomaly, seal, unseal
from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.docker.config import DockerConfig
from sandbox_env.models import ExecStatus, ExecutionResult
from sandbox_env.policy import Policy

logger = logging.getLogger(__name__)
T = TypeVar("T")

OWNER_LABEL, EPISODE_LABEL, POLICY_LABEL = "sandbox-env.owner", "sandbox-env.episode", "sandbox-env.policy"
SERVER_LABEL = "sandbox-env.server"  # "<pid>:<start time>" of the server process that made it
SANDBOX_UID = 10001  # the image's `sandbox` user; never root
SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_UID}"
WORKSPACE = "/workspace"
ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKSPACE, "LANG": "C.UTF-8",
               "TMPDIR": "/tmp"}
HOST_GRACE_S = 3.0  # the runner enforces the step limit itself; this is the server's backstop
START_TIMEOUT_S = 60.0
PROGRAM_MARGIN_S = 10.0  # killing the agent's processes and wiping its files, before and after
DAEMON_WAIT_S = 30.0  # a daemon restarting (stop: 10-15 s, start: a few s), under a client's 60 s reply wait
MB = 1 << 20
BOOTSTRAP = ("import os\ndef r(n):\n b=b''\n while len(b)<n:\n  c=os.read(0,n-len(b))\n"
             "  if not c:raise SystemExit(3)\n  b+=c\n return b\n"
             "exec(compile(r(int.from_bytes(r(4),'big')),'<sandbox-boot>','exec'),{'__name__':'__main__'})\n")
RUNNER_MODULES = ("bundle", "wire", "bounded", "procs", "slate", "untrusted", "worker", "zygote", "runner")
LARGE_FRAME = 256 << 10  # decoded and validated in a thread: the event loop stays free
STDERR_LINES = 5  # per container: what the supervisor itself printed (a crash), escaped and cut
STDERR_BYTES = 300
_EXECUTOR = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sandbox-docker")


@functools.lru_cache(maxsize=1)
def runner_program() -> bytes:
    """What the bootstrap runs: the supervisor and everything it starts, as one program text."""
    return (bundle(*RUNNER_MODULES) + "from sandbox_env.inside.runner import main\nmain()\n").encode()


def default_image() -> str:
    return f"sandbox-env/python:{__version__}"


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


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


@functools.lru_cache(maxsize=1)
def get_client() -> docker.DockerClient:
    """The process-wide docker-py client; DOCKER_HOST and friends are docker-py's business."""
    try:
        return docker.from_env(max_pool_size=32, timeout=120)
    except docker.errors.DockerException as exc:
        raise KernelUnavailableError(f"Docker engine unreachable: {exc}") from exc


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, functools.partial(fn, *args, **kwargs))


@functools.lru_cache(maxsize=1)
def registered_runtimes() -> frozenset[str]:
    """Runtimes the daemon knows (asked once: a daemon gains runtimes only on restart)."""
    try:
        return frozenset((get_client().info().get("Runtimes") or {}).keys())
    except (docker.errors.DockerException, KernelUnavailableError):
        return frozenset()


def container_options(policy: Policy, *, image: str, owner: str, episode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(create_container kwargs, host-config kwargs): the whole hardening in one place."""
    file_size = policy.file_size_mb * MB
    host = {
        "network_mode": "bridge" if policy.network else "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={policy.tmp_mb}m",
                  WORKSPACE: f"rw,nosuid,nodev,size={policy.workspace_mb}m,uid={SANDBOX_UID},gid={SANDBOX_UID},"
                             "mode=0700"},
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
    create = {
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
    return create, host


class DockerKernel(Kernel):
    """A stateful Python interpreter in its own hardened container."""

    name = "docker"

    config_class = DockerConfig
    config: DockerConfig

    def __init__(self, policy: Policy, config: DockerConfig | None = None, *,
                 client: docker.DockerClient | None = None) -> None:
        super().__init__(policy, config)
        self.image = self.config.image or policy.image or default_image()
        self.owner = self.config.owner or default_owner()
        self.kernel_id = uuid.uuid4().hex
        self._client = client
        self.container_id: str | None = None
        self.probe: dict[str, Any] = {}
        self.execution_count = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending = bytearray()
        self._key = b""
        self._sent = self._received = 0
        self._last_size = 0
        self._stderr_lines = 0
        self._lock = asyncio.Lock()
        self._boot_task: asyncio.Task[None] | None = None
        self._removals: set[asyncio.Future[None]] = set()  # outlive a cancelled caller; close() waits
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    async def setup_backend(cls) -> dict[str, Any]:
        """At server start: remove this owner's orphans (a crash's leftovers), report the runtime."""
        try:
            removed = await asyncio.to_thread(functools.partial(cleanup_orphans, default_owner(), keep_live=True))
            report = await asyncio.to_thread(runtime_report)
        except docker.errors.DockerException as exc:
            raise KernelUnavailableError(f"Docker engine unusable: {exc}") from exc
        return {**report, "owner": default_owner(), "orphans_removed": removed}

    @classmethod
    async def teardown_backend(cls) -> None:
        """At server shutdown, after every kernel is closed: remove anything of ours still there."""
        try:
            await asyncio.to_thread(functools.partial(cleanup_orphans, default_owner(), server=server_instance()))
        except Exception as exc:  # noqa: BLE001 - shutting down: log, the next start sweeps again
            logger.warning("orphan cleanup at shutdown failed: %r", exc)

    async def start(self) -> None:
        if self._closed:
            raise KernelError("kernel is closed")
        if self._reader is None:
            await self._boot()

    def is_alive(self) -> bool:
        if self._closed:
            return False
        if self._boot_task is not None and not self._boot_task.done():
            return True
        return self._reader is not None and not self._reader.at_eof()

    async def close(self) -> None:
        """Remove the container (kill, no graceful stop) and wait until the daemon forgot it."""
        if self._closed:
            return
        self._closed = True
        task, self._boot_task = self._boot_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._discard()
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    async def _boot(self) -> None:
        """Start a container. While nothing listens on the daemon's socket (a daemon restarting),
        wait for it with backoff, up to DAEMON_WAIT_S, instead of failing the request at once."""
        for delay in _backoff(0.1):
            try:
                await self._boot_once()
                return
            except _DaemonUnreachable as exc:
                if self._closed or delay is None:
                    raise KernelStartError(f"container did not start: the Docker daemon did not answer "
                                           f"for {DAEMON_WAIT_S:g} s: {exc.__cause__!r}") from exc
                logger.warning("Docker daemon unreachable; retrying in %.1f s: %r", delay, exc.__cause__)
                await asyncio.sleep(delay)

    async def _boot_once(self) -> None:
        client = self._client or get_client()
        create, host = container_options(self.policy, image=self.image, owner=self.owner,
                                         episode=self.kernel_id)
        try:
            host_config = client.api.create_host_config(**host)
            creating = asyncio.ensure_future(_call(client.api.create_container, host_config=host_config, **create))
            try:
                created = await asyncio.shield(creating)
            except asyncio.CancelledError:  # the daemon creates it all the same: remove it then
                self._track(self._remove_when_created(creating))  # before close() gathers removals
                raise
            self.container_id = created["Id"]
            sock = await _call(client.api.attach_socket, self.container_id,
                               params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            raw = _raw_socket(sock)
            await _call(client.api.start, self.container_id)
            self._pending.clear()
            self._reader, self._writer = await asyncio.open_connection(sock=raw)
            # Plain start-up frames (no episode code runs yet): the program, its config, the key.
            self._key, self._sent, self._received, self._stderr_lines = os.urandom(KEY_SIZE), 0, 0, 0
            self._send_plain(runner_program())
            self._send_plain(json.dumps({"op": "config", "output_bytes": self.policy.output_bytes,
                                         "output_limit_bytes": self.policy.output_limit_bytes,
                                         "cpu_time_s": self.policy.cpu_time_s}).encode())
            self._send_plain(self._key)
            ready = await asyncio.wait_for(self._read_frame(), START_TIMEOUT_S)
        except docker.errors.ImageNotFound as exc:
            await self._discard()
            raise KernelUnavailableError(f"image {self.image} not found; build it with "
                                         "`sandbox-env images build`") from exc
        except (TimeoutError, docker.errors.DockerException, OSError, asyncio.IncompleteReadError, ValueError,
                Anomaly) as exc:
            await self._discard()
            if self.policy.runtime and "runtime" in str(exc).lower():
                raise KernelUnavailableError(f"runtime {self.policy.runtime!r} is not available: {exc}") from exc
            if _daemon_unreachable(exc):
                raise _DaemonUnreachable() from exc
            raise KernelStartError(f"container did not start: {exc!r}") from exc
        except BaseException:
            await self._discard()
            raise
        if ready.get("op") != "ready" or ready.get("id") != 0:
            await self._discard()
            raise KernelStartError(f"unexpected first frame from the runner: {str(ready)[:200]}")
        self.probe = ready.get("probe") or {}
        logger.debug("container %s ready: %s", self.container_id[:12], self.probe)

    async def _discard(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
        container, self.container_id = self.container_id, None
        if container is not None:
            await asyncio.shield(self._remove_later(container))  # even if our caller is cancelled

    def _remove_later(self, container: str) -> asyncio.Future[None]:
        return self._track(self._remove(container))

    def _track(self, removal: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """A removal that outlives a cancelled caller; close() waits for every one."""
        future = asyncio.ensure_future(removal)
        self._removals.add(future)
        future.add_done_callback(self._removals.discard)
        return future

    async def _remove_when_created(self, creating: asyncio.Future[Any]) -> None:
        try:
            created = await creating
        except Exception:  # noqa: BLE001 - nothing was created
            return
        await self._remove(created["Id"])

    async def _remove(self, container: str) -> None:
        """Retried with backoff while the daemon fails or does not listen (a restart), up to
        DAEMON_WAIT_S: a container created just before the daemon went down is removed once it
        is back, not left for the next server start's sweep."""
        for delay in _backoff(0.2):
            try:
                if await _call(remove_container, self._client or get_client(), container):
                    return
                failure: object = "the daemon failed"
            except Exception as exc:  # noqa: BLE001 - unreachable: try again below
                failure = exc
            if delay is None:  # cleanup_orphans() at the next start
                logger.warning("could not remove container %s: %r", container[:12], failure)
                return
            await asyncio.sleep(delay)

    # -- steps -----------------------------------------------------------------------------
    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        timeout = float(timeout_s or self.policy.timeout_s)
        async with self._lock:
            result = await self._exchange({"op": "exec", "code": code, "timeout": timeout}, timeout + HOST_GRACE_S)
            result.execution_count = self.execution_count
            return result

    async def run_program(self, source: str, *, stdin: bytes = b"", timeout_s: float) -> ExecutionResult:
        """A fresh `python3 -I -c source` in this container, after the supervisor killed every
        other process and wiped /workspace and /tmp (see `Supervisor.run_program`)."""
        async with self._lock:
            request = {"op": "run", "source": source, "stdin": base64.b64encode(stdin).decode(),
                       "timeout": float(timeout_s)}
            return await self._exchange(request, timeout_s + HOST_GRACE_S + PROGRAM_MARGIN_S)

    async def _exchange(self, request: dict[str, Any], budget_s: float) -> ExecutionResult:
        """One request and its result. Whatever the code did comes back as a result; what was done
        to the sandbox from outside (a kill, stop or pause the daemon logged), or a frame the
        supervisor cannot have sent, raises a retryable KernelDiedError."""
        await self._ensure_running()
        self.execution_count += 1
        started, since = time.perf_counter(), time.time()
        try:
            async with asyncio.timeout(budget_s):  # no extra task, unlike wait_for
                reply = await self._request(request)
            tampered = reply.pop("tampered", None)
            fields = {k: v for k, v in reply.items() if k not in ("op", "id")}
            result = (await asyncio.to_thread(ExecutionResult.model_validate, fields) if self._last_size > LARGE_FRAME
                      else ExecutionResult.model_validate(fields))  # a big reply is parsed off the event loop
            if tampered:  # this result stands; nothing runs in that container again
                logger.warning("container %s replaced: %s", (self.container_id or "")[:12], tampered)
                self._schedule_boot()
        except Anomaly as exc:
            raise await self._anomaly(exc) from exc
        except TimeoutError as exc:
            # The code can silence its supervisor (lower its limits, starve it); unless the daemon
            # logged a kill/stop/pause from outside, the silence is the code's timeout.
            if await self._killed_from_outside(since):
                self._schedule_boot()
                raise KernelDiedError("the sandbox was stopped from outside") from exc
            result = await self._lost(ExecStatus.TIMEOUT, 124, "the sandbox did not answer in time")
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, ValidationError) as exc:
            # Killed from outside (docker kill/rm, daemon trouble): the service's failure. The code
            # bringing its own container down (memory, say): the code's, reported as a result.
            if await self._killed_from_outside(since):
                self._schedule_boot()
                raise KernelDiedError(f"the sandbox was stopped from outside: {exc!r}") from exc
            logger.info("container %s lost during a request: %r", self.container_id, exc)
            status, exit_code = await self._death_status()
            result = await self._lost(status, exit_code, "the sandbox container died")
        except BaseException:
            self._schedule_boot()  # cancelled mid-frame: the channel cannot be trusted any more
            raise
        result.wall_time_s = time.perf_counter() - started
        return result

    async def _anomaly(self, exc: Anomaly) -> KernelDiedError:
        """A frame the supervisor cannot have sent: this container is removed now and never used
        again; the error to raise for the request."""
        logger.warning("container %s: protocol anomaly (%s); removed", (self.container_id or "")[:12], exc)
        await self._discard()
        self._schedule_boot()
        return KernelDiedError(f"the sandbox's channel saw an anomaly ({exc}); it was replaced")

    async def _killed_from_outside(self, since: float) -> bool:
        """The daemon logged a kill, stop or pause of the container (or cannot say): the service's
        failure. Otherwise only the program can have silenced or killed its supervisor."""
        container = self.container_id
        if self._closed:
            return False  # closed by its owner: the step ends as a kill (see `_lost`)
        if container is None:
            return True
        try:
            events = await _call(container_events, self._client or get_client(), container, since)
        except Exception:  # noqa: BLE001 - the daemon itself is in trouble: infrastructure
            return True
        return any(event.get("Action") in ("kill", "stop", "pause") for event in events)

    async def inspect(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.name, "kernel_id": self.kernel_id, "image": self.image,
                                "container_id": self.container_id, "policy": self.policy.name,
                                "execution_count": self.execution_count, "probe": self.probe}
        if self._lock.locked() or not self.is_alive() or self._boot_task is not None:
            return {**info, "variables": [], "busy": self._lock.locked()}
        async with self._lock:
            try:
                reply = await asyncio.wait_for(self._request({"op": "inspect"}), 5.0)
            except Anomaly as exc:
                await self._anomaly(exc)
                return {**info, "variables": []}
            except (TimeoutError, asyncio.IncompleteReadError, OSError, ValueError):
                self._schedule_boot()
                return {**info, "variables": []}
        variables = reply.get("variables") if isinstance(reply.get("variables"), dict) else {}
        return {**info, "memory_mb": reply.get("memory_mb"), "cpu_time_s": reply.get("cpu_time_used_s"),
                "processes": reply.get("processes"),
                "variables": [{"name": name, **row} for name, row in variables.items() if isinstance(row, dict)]}

    async def _ensure_running(self) -> None:
        if self._closed:
            raise KernelError("kernel is closed")
        task = self._boot_task
        if task is not None:
            self._boot_task = None
            await task  # a failed replacement raises its KernelStartError here
        elif self._reader is None or self._reader.at_eof():
            await self._discard()
            await self._boot()

    def _schedule_boot(self) -> None:
        """Replace the container in the background; the next step waits for it."""
        async def replace() -> None:
            await self._discard()
            if not self._closed:
                await self._boot()

        if not self._closed:
            self._boot_task = asyncio.get_running_loop().create_task(replace())

    async def _lost(self, status: ExecStatus, exit_code: int, why: str) -> ExecutionResult:
        if self._closed:
            return ExecutionResult(status=ExecStatus.KILLED, exit_code=137,
                                   stderr="[sandbox-env] the kernel was closed during the step\n")
        self._schedule_boot()
        return ExecutionResult(status=status, exit_code=exit_code,
                               stderr=f"[sandbox-env] {why} ({status.value}); the next step runs in a "
                                      "fresh interpreter (variables lost)\n")

    async def _death_status(self) -> tuple[ExecStatus, int]:
        if self.container_id is None:
            return ExecStatus.KILLED, 137
        try:
            state = (await _call((self._client or get_client()).api.inspect_container,
                                 self.container_id))["State"]
        except Exception:  # noqa: BLE001 - gone (auto-removed) or daemon trouble: report a plain kill
            return ExecStatus.KILLED, 137
        if state.get("OOMKilled"):
            return ExecStatus.OOM, 137
        return ExecStatus.KILLED, int(state.get("ExitCode") or 137)

    # -- framing ---------------------------------------------------------------------------
    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one authenticated request; its reply must carry its id (and verify, in sequence)."""
        if self._writer is None:
            raise ConnectionError("no channel to the sandbox")
        request_id = self._sent + 1  # 0 is the ready frame's
        self._writer.write(seal(self._key, TO_SANDBOX, self._sent, {**message, "id": request_id}))
        self._sent += 1
        await self._writer.drain()
        reply = await self._read_frame()
        if reply.get("op") == "anomaly":
            raise Anomaly(f"the supervisor rejected request {request_id}: {str(reply.get('why'))[:200]!r}")
        if reply.get("id") != request_id:
            raise Anomaly(f"a reply to request {reply.get('id')!r} came for request {request_id}")
        return reply

    def _send_plain(self, data: bytes) -> None:
        if self._writer is None:
            raise ConnectionError("no channel to the sandbox")
        self._writer.write(HEADER.pack(len(data)) + data)

    async def _read_frame(self) -> dict[str, Any]:
        size = HEADER.unpack(await self._read_stdout(HEADER.size))[0]
        if size > MAX_FRAME:
            raise Anomaly(f"a frame of {size} bytes")
        mac, body = await self._read_stdout(TAG_SIZE), await self._read_stdout(size)
        self._last_size = size
        if size > LARGE_FRAME:
            reply = await asyncio.to_thread(unseal, self._key, TO_SERVER, self._received, mac, body)
        else:
            reply = unseal(self._key, TO_SERVER, self._received, mac, body)
        self._received += 1
        return reply

    async def _read_stdout(self, n: int) -> bytes:
        """Bytes of the container's stdout, taken out of Docker's 8-byte-header multiplexing."""
        reader = self._reader
        if reader is None:
            raise ConnectionError("no channel to the sandbox")
        while len(self._pending) < n:
            header = await reader.readexactly(8)
            size = int.from_bytes(header[4:8], "big")
            data = await reader.readexactly(size)
            if header[0] == 1:
                self._pending += data
            else:
                self._log_stderr(data)
        chunk = bytes(self._pending[:n])
        del self._pending[:n]
        return chunk

    def _log_stderr(self, data: bytes) -> None:
        """Only the supervisor writes to the container's stderr (a crash): log a few lines of it,
        escaped (no line of the log can be forged) and cut."""
        if not data.strip() or self._stderr_lines > STDERR_LINES:
            return
        self._stderr_lines += 1
        if self._stderr_lines > STDERR_LINES:
            logger.warning("sandbox %s: further stderr is not logged", self.kernel_id[:12])
            return
        logger.warning("sandbox %s stderr: %r", self.kernel_id[:12], data[:STDERR_BYTES])


def _backoff(first_s: float) -> Iterator[float | None]:
    """The pauses between tries of something the daemon must answer: doubling from `first_s` up
    to 2 s while they fit in DAEMON_WAIT_S, then None: the last try."""
    deadline, delay = time.monotonic() + DAEMON_WAIT_S, first_s
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(2 * delay, 2.0)
    yield None


class _DaemonUnreachable(KernelStartError):
    """Nothing listens on the daemon's socket (stopped, restarting); its cause says how it failed."""


def _daemon_unreachable(exc: BaseException) -> bool:
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


def _raw_socket(sock: Any) -> socket.socket:
    """A plain socket for asyncio, taken over (not shared) from docker-py's hijacked connection."""
    raw = getattr(sock, "_sock", sock)
    if not isinstance(raw, socket.socket) or raw.__class__.__name__ == "SSLSocket":
        raise KernelUnavailableError("the docker backend needs a unix or plain TCP DOCKER_HOST")
    owned = socket.socket(raw.family, raw.type, fileno=raw.detach())
    owned.setblocking(False)
    return owned


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
    list(_EXECUTOR.map(lambda cid: remove_container(client, cid), ids))
    if ids:
        logger.warning("removed %d orphaned sandbox containers (%s)", len(ids), ", ".join(labels))
    return len(ids)


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
