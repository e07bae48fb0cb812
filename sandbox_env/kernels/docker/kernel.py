"""Docker backend: one hardened container per episode, a supervisor spoken to over the attach socket.

The container runs, as PID 1, a tiny bootstrap that reads the supervisor (a bundle of
`sandbox_env.inside`) from stdin, so the image needs only python3 (`containers`: options, labels,
removal, orphans). Requests and replies are authenticated frames on its stdin/stdout (`channel`);
a frame the supervisor cannot have sent is an anomaly: the container is removed at once and never
used again, and the request becomes a retryable infrastructure error. docker-py calls run in a
thread pool (`daemon`), so the event loop never blocks. The container is removed with
`remove(force=True)`; a step the supervisor cannot answer in time costs the episode its container,
which is replaced by a fresh one (empty namespace) before the next step.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import docker
import docker.errors
from pydantic import ValidationError

from sandbox_env import languages
from sandbox_env.errors import (
    KernelDiedError,
    KernelError,
    KernelStartError,
    KernelUnavailableError,
    LanguageUnavailableError,
)
from sandbox_env.inside.wire import Anomaly
from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.docker.channel import LARGE_FRAME, Channel, raw_socket
from sandbox_env.kernels.docker.config import DockerConfig
from sandbox_env.kernels.docker.containers import (
    cleanup_orphans,
    container_options,
    cpu_charge,
    death_status,
    default_image,
    default_owner,
    memory_charge,
    process_count,
    remove_container,
    server_instance,
    stopped_from_outside,
    sweep_and_report,
)
from sandbox_env.kernels.docker.daemon import DAEMON_WAIT_S, backoff, call_in_pool, daemon_unreachable, get_client
from sandbox_env.kernels.docker.recycling import make_slate, unfit
from sandbox_env.kernels.inspection import parse_snapshot
from sandbox_env.models import ExecStatus, ExecutionResult
from sandbox_env.policy import Policy

logger = logging.getLogger(__name__)

HOST_GRACE_S = 3.0  # the runner enforces the step limit itself; this is the server's backstop
START_TIMEOUT_S = 60.0
PROGRAM_MARGIN_S = 10.0  # killing the agent's processes and wiping its files, before and after


def image_for(policy: Policy, config: DockerConfig) -> str:
    """A language's own image (`languages.py`); Python's: the configured one, else the policy's,
    else the default."""
    if policy.language != languages.DEFAULT:
        return languages.get(policy.language).image()
    return config.image or policy.image or default_image()


def build_command(policy: Policy) -> str:
    if policy.language != languages.DEFAULT:
        return languages.get(policy.language).build_command
    return "sandbox-env images build"


_IMAGES_SEEN: set[str] = set()  # images found once: no daemon call per grading after that


class DockerKernel(Kernel):
    """A stateful Python interpreter in its own hardened container."""

    name = "docker"
    recycles = True

    config_class = DockerConfig
    config: DockerConfig

    def __init__(self, policy: Policy, config: DockerConfig | None = None, *,
                 client: docker.DockerClient | None = None) -> None:
        super().__init__(policy, config)
        self.image = image_for(policy, self.config)
        self.owner = self.config.owner or default_owner()
        self.kernel_id = uuid.uuid4().hex
        self._client = client
        self.container_id: str | None = None
        self.probe: dict[str, Any] = {}
        self.execution_count = 0
        self._channel: Channel | None = None
        self._lock = asyncio.Lock()
        self._boot_task: asyncio.Task[None] | None = None
        self._removals: set[asyncio.Future[None]] = set()  # outlive a cancelled caller; close() waits
        self._closed = False
        self._tainted = False  # its container was lost, replaced or tampered with: never recycled

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    async def check_language(cls, language: languages.Language) -> None:
        """A language runs in its own image: it must have been built on this host."""
        if language.name == languages.DEFAULT or language.image() in _IMAGES_SEEN:
            return
        tag = language.image()

        def present() -> bool:
            try:
                get_client().images.get(tag)
                return True
            except docker.errors.ImageNotFound:
                return False

        try:
            found = await call_in_pool(present)
        except docker.errors.DockerException as exc:
            raise KernelUnavailableError(f"Docker engine unreachable: {exc}") from exc
        if not found:
            raise LanguageUnavailableError(f"{language.name} is not available on this server: its image {tag} "
                                           f"is not built (run `{language.build_command}`)", language=language.name)
        _IMAGES_SEEN.add(tag)

    @classmethod
    async def setup_backend(cls) -> dict[str, Any]:
        """At server start: remove this owner's orphans (a crash's leftovers), report the runtime."""
        try:
            return await asyncio.to_thread(sweep_and_report)
        except docker.errors.DockerException as exc:
            raise KernelUnavailableError(f"Docker engine unusable: {exc}") from exc

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
        if self._channel is None:
            await self._boot()

    def is_alive(self) -> bool:
        if self._closed:
            return False
        if self._boot_task is not None and not self._boot_task.done():
            return True
        return self._channel is not None and not self._channel.at_eof()

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

    async def recycle(self) -> str | None:
        """The supervisor makes the next episode's slate and checks it (`recycling.make_slate`);
        any refusal removes the container now. If this raises (cancelled), the caller closes."""
        why = unfit(closed=self._closed, reuses=self.reuses, allowed=self.policy.reuses, busy=self._lock.locked(),
                    tainted=self._tainted or self._boot_task is not None or not self.is_alive())
        if why is None:
            async with self._lock:
                try:
                    why = await make_slate(self._live_channel(), self.container_id or "")
                except BaseException:
                    self._tainted = True  # cancelled mid-frame: the channel cannot be trusted
                    raise
        if why is not None:
            await self.close()
            return why
        self.reuses, self.execution_count = self.reuses + 1, 0
        return None

    async def _boot(self) -> None:
        """Start a container. While nothing listens on the daemon's socket (a daemon restarting),
        wait for it with backoff, up to DAEMON_WAIT_S, instead of failing the request at once."""
        for delay in backoff(0.1):
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
            self.container_id = await self._create(client, create, host)
            self._channel = await self._attach_and_start(client, self.container_id)
            self._channel.send_start_up({"op": "config", "output_bytes": self.policy.output_bytes,
                                         "output_limit_bytes": self.policy.output_limit_bytes,
                                         "cpu_time_s": self.policy.cpu_time_s})
            ready = await asyncio.wait_for(self._channel.read_frame(), START_TIMEOUT_S)
        except docker.errors.ImageNotFound as exc:
            await self._discard()
            raise KernelUnavailableError(f"image {self.image} not found; build it with "
                                         f"`{build_command(self.policy)}`") from exc
        except (TimeoutError, docker.errors.DockerException, OSError, asyncio.IncompleteReadError, ValueError,
                Anomaly) as exc:
            await self._discard()
            raise self._start_error(exc) from exc
        except BaseException:
            await self._discard()
            raise
        if ready.get("op") != "ready" or ready.get("id") != 0:
            await self._discard()
            raise KernelStartError(f"unexpected first frame from the runner: {str(ready)[:200]}")
        self.probe = ready.get("probe") or {}
        logger.debug("container %s ready: %s", self.container_id[:12], self.probe)

    async def _create(self, client: docker.DockerClient, create: dict[str, Any], host: dict[str, Any]) -> str:
        host_config = client.api.create_host_config(**host)
        creating = asyncio.ensure_future(call_in_pool(client.api.create_container, host_config=host_config, **create))
        try:
            created = await asyncio.shield(creating)
        except asyncio.CancelledError:  # the daemon creates it all the same: remove it then
            self._track(self._remove_when_created(creating))  # before close() gathers removals
            raise
        return created["Id"]

    async def _attach_and_start(self, client: docker.DockerClient, container: str) -> Channel:
        sock = await call_in_pool(client.api.attach_socket, container,
                                  params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        raw = raw_socket(sock)  # before the start: a TLS DOCKER_HOST never starts a container
        await call_in_pool(client.api.start, container)
        return await Channel.open(raw, self.kernel_id)

    def _start_error(self, exc: BaseException) -> KernelError:
        """A runtime the daemon lacks, a daemon not listening (`_boot` waits for it), or else a failed start."""
        if self.policy.runtime and "runtime" in str(exc).lower():
            return KernelUnavailableError(f"runtime {self.policy.runtime!r} is not available: {exc}")
        if daemon_unreachable(exc):
            return _DaemonUnreachable()
        return KernelStartError(f"container did not start: {exc!r}")

    async def _discard(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
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
        for delay in backoff(0.2):
            try:
                if await call_in_pool(remove_container, self._client or get_client(), container):
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
            result = await self._exchange({"op": "exec", "code": code, "timeout": timeout}, timeout + HOST_GRACE_S,
                                          progress=self._progress)
            result.execution_count = self.execution_count
            return result

    async def run_program(self, source: str, *, stdin: bytes = b"", timeout_s: float) -> ExecutionResult:
        """A fresh `python3 -I -c source` in this container, after the supervisor killed every
        other process and wiped /workspace and /tmp (see `Supervisor.run_program`)."""
        async with self._lock:
            request = {"op": "run", "source": source, "stdin": base64.b64encode(stdin).decode(),
                       "timeout": float(timeout_s)}
            return await self._exchange(request, timeout_s + HOST_GRACE_S + PROGRAM_MARGIN_S)

    def _progress(self, frame: dict[str, Any]) -> None:
        """A running step's output so far, for inspection (bounded by `LiveOutput`)."""
        for name in ("stdout", "stderr"):
            if type(frame.get(name)) is str:
                self.live.write(name, frame[name])

    async def _exchange(self, request: dict[str, Any], budget_s: float,
                        progress: Callable[[dict[str, Any]], None] | None = None) -> ExecutionResult:
        """One request and its result. Whatever the code did comes back as a result; what was done
        to the sandbox from outside (a kill, stop or pause the daemon logged), or a frame the
        supervisor cannot have sent, raises a retryable KernelDiedError."""
        await self._ensure_running()
        self.execution_count += 1
        started, since = time.perf_counter(), time.time()
        try:
            channel = self._live_channel()
            async with asyncio.timeout(budget_s):  # no extra task, unlike wait_for
                reply = await channel.request(request, progress)
            result = await self._result(reply, channel.last_frame_size)
        except Anomaly as exc:
            raise await self._anomaly(exc) from exc
        except TimeoutError as exc:
            result = await self._silenced(since, exc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, ValidationError) as exc:
            result = await self._container_lost(since, exc)
        except BaseException:
            self._schedule_boot()  # cancelled mid-frame: the channel cannot be trusted any more
            raise
        result.wall_time_s = time.perf_counter() - started
        return result

    def _live_channel(self) -> Channel:
        if self._channel is None:
            raise ConnectionError("no channel to the sandbox")
        return self._channel

    async def _result(self, reply: dict[str, Any], size: int) -> ExecutionResult:
        tampered = reply.pop("tampered", None)
        self.snapshot = parse_snapshot(reply.pop("snapshot", None))  # the sandbox's to forge: bounded
        fields = {k: v for k, v in reply.items() if k not in ("op", "id")}
        result = (await asyncio.to_thread(ExecutionResult.model_validate, fields) if size > LARGE_FRAME
                  else ExecutionResult.model_validate(fields))  # a big reply is parsed off the event loop
        if tampered:  # this result stands; nothing runs in that container again
            logger.warning("container %s replaced: %s", (self.container_id or "")[:12], tampered)
            self._schedule_boot()
        return result

    async def _silenced(self, since: float, exc: TimeoutError) -> ExecutionResult:
        """The code can silence its supervisor (lower its limits, starve it); unless the daemon
        logged a kill/stop/pause from outside, the silence is the code's timeout."""
        if await self._killed_from_outside(since):
            self._schedule_boot()
            raise KernelDiedError("the sandbox was stopped from outside") from exc
        return await self._lost(ExecStatus.TIMEOUT, 124, "the sandbox did not answer in time")

    async def _container_lost(self, since: float, exc: Exception) -> ExecutionResult:
        """Killed from outside (docker kill/rm, daemon trouble): the service's failure. The code
        bringing its own container down (memory, say): the code's, reported as a result."""
        if await self._killed_from_outside(since):
            self._schedule_boot()
            raise KernelDiedError(f"the sandbox was stopped from outside: {exc!r}") from exc
        logger.info("container %s lost during a request: %r", self.container_id, exc)
        status, exit_code = await self._death_status()
        return await self._lost(status, exit_code, "the sandbox container died")

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
        if self._closed:
            return False  # closed by its owner: the step ends as a kill (see `_lost`)
        if self.container_id is None:
            return True
        return await call_in_pool(stopped_from_outside, self._client or get_client(), self.container_id, since)

    async def usage(self) -> dict[str, Any]:
        """The container's memory and CPU charge, from the host's cgroup files: no request to the
        sandbox, so it answers while a step runs."""
        if self.container_id is None:
            return {"memory_mb": None, "cpu_time_s": None}
        memory = memory_charge(self.container_id)
        return {"memory_mb": None if memory is None else round(memory / (1 << 20), 1),
                "cpu_time_s": cpu_charge(self.container_id), "processes": process_count(self.container_id)}

    async def inspect(self) -> dict[str, Any]:
        """The last step's snapshot and resource use now; nothing is asked of the sandbox."""
        return {**await super().inspect(), "backend": self.name, "kernel_id": self.kernel_id, "image": self.image,
                "container_id": self.container_id, "policy": self.policy.name,
                "execution_count": self.execution_count, "probe": self.probe, "busy": self._lock.locked()}

    async def memory_bytes(self) -> int | None:
        """The container's memory cgroup charge, from the host's cgroup files (`memory_charge`)."""
        return None if self.container_id is None else memory_charge(self.container_id)

    async def _ensure_running(self) -> None:
        if self._closed:
            raise KernelError("kernel is closed")
        task = self._boot_task
        if task is not None:
            self._boot_task = None
            await task  # a failed replacement raises its KernelStartError here
        elif self._channel is None or self._channel.at_eof():
            self._tainted = True
            await self._discard()
            await self._boot()

    def _schedule_boot(self) -> None:
        """Replace the container in the background; the next step waits for it."""
        async def replace() -> None:
            await self._discard()
            if not self._closed:
                await self._boot()

        self._tainted = True
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
        return await call_in_pool(death_status, self._client or get_client(), self.container_id)


class _DaemonUnreachable(KernelStartError):
    """Nothing listens on the daemon's socket (stopped, restarting); its cause says how it failed."""
