"""One episode: a kernel from the pool, reset/step/state around it, and its step history."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from sandbox_env.errors import (
    EpisodeClosedError,
    EpisodeError,
    InvalidRequestError,
    KernelDiedError,
    KernelError,
    TaskError,
)
from sandbox_env.grading.driver import choose_reward, grade, task_language
from sandbox_env.grading.tasks import Task
from sandbox_env.history import StepHistory
from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.inspection import LiveOutput
from sandbox_env.models import (
    GRADING_KEY,
    TASK_KEY,
    CodeAction,
    CodeObservation,
    EpisodeState,
    Grading,
)

# (policy name or None for the default) -> a started kernel, never used or recycled (`Kernel.recycle`)
KernelSource = Callable[[str | None], Awaitable[Kernel]]
# takes back a kernel whose episode is over (to recycle or close it); never waits
KernelSink = Callable[[Kernel], bool]  # True: it took the kernel (the pool recycles it)
# (task_id, inline task, policy name) -> the task; raises TaskNotFoundError / TaskError
TaskResolver = Callable[[str | None, Any, str | None], Task]
# (task, submission, policy name, reward policy) -> its grading, in a sandbox of the task's language
Grader = Callable[[Task, str, str, str], Awaitable[Grading]]
HISTORY_BYTES = 1 << 20  # default budget of one episode's step history (Settings.history_bytes)
# State fields a reset option must not overwrite (a client could otherwise plant a fake grading).
MAX_OPTIONS_BYTES = 4096  # reset options are echoed in every state reply: a small, fixed cost
RESERVED_STATE_KEYS = frozenset(EpisodeState.model_fields) | {"task_id", "grading", "seed"}
SAMPLE_S = 0.5  # resource use is sampled this often while a step runs (and at each step's start and end)
MAX_SAMPLES = 512  # kept per episode: past it, every other one goes (the whole life, coarser)
RUNNING_CODE_CHARS = 64 << 10  # of a running step's code, shown by inspection


class Samples:
    """Memory and CPU over an episode's life: `{"t", "memory_mb", "cpu_time_s"}`, at most
    MAX_SAMPLES, thinned (every other one dropped, the interval doubled) when full."""

    def __init__(self) -> None:
        self.items: deque[dict[str, Any]] = deque()
        self.interval = 0.0  # samples closer than this to the last one are skipped

    def add(self, usage: dict[str, Any], *, force: bool = False) -> None:
        now = time.time()
        if not force and self.items and now - self.items[-1]["t"] < self.interval:
            return
        self.items.append({"t": round(now, 3), "memory_mb": usage.get("memory_mb"), "cpu_time_s": usage.get("cpu_time_s")})
        if len(self.items) > MAX_SAMPLES:
            self.items = deque(list(self.items)[::2])
            self.interval = max(SAMPLE_S, self.interval * 2)

    def clear(self) -> None:
        self.items.clear()
        self.interval = 0.0


class Episode:
    """Reset always takes another kernel, never used or proven clean since its last episode
    (`Kernel.recycle`), so no namespace, file or process survives a reset. A kernel the episode
    is done with goes to `release` (its pool), or without one is closed."""

    def __init__(self, acquire: KernelSource, *, backend: str, tasks: TaskResolver | None = None,
                 reward: str | None = None, owner: str = "", history_bytes: int = HISTORY_BYTES,
                 release: KernelSink | None = None, on_end: Callable[[dict[str, Any]], None] | None = None,
                 id_prefix: str = "", grade_elsewhere: Grader | None = None) -> None:
        self._acquire = acquire
        self._grade_elsewhere = grade_elsewhere  # a task in another language: its own sandbox
        self._on_end = on_end  # takes the record of each episode that ends (a reset, the close): for export
        self._id_prefix = id_prefix  # in a farm, "<replica>.": the id names the replica that owns it
        self._release = release
        self.owner = owner  # the tenant (token) that opened it
        # Names the episode from its first moment (its episode_id comes with the first reset), so
        # inspection lists it and DELETE reaches it before any reset; MCP session ids are this.
        self.session_id = id_prefix + uuid.uuid4().hex
        self._resolve_task = tasks
        self._reward = reward  # the server's default reward policy
        self.task: Task | None = None
        self.backend = backend
        self._kernel: Kernel | None = None
        self._lock = asyncio.Lock()
        self._state = EpisodeState(backend=backend)
        self._kernel_lost = False
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        self._done = False
        self.created_at = time.time()
        self.reset_at: float | None = None
        self.last_active = time.monotonic()
        self.history = StepHistory(history_bytes)
        # Inspection's own copies: it reads these and the kernel's cgroup files, never the
        # interpreter. `live` follows the running step's output (kernels that stream write it);
        # `snapshot` is the namespace as the sandbox's trusted code listed it after step N.
        self.live = LiveOutput()
        self.running: dict[str, Any] | None = None  # {"step", "code", "started"} while a step runs
        self.snapshot: dict[str, Any] | None = None
        self.samples = Samples()
        self.image: str | None = None  # the kernel's image (Docker), for the exported record

    @property
    def state(self) -> EpisodeState:
        return self._state.model_copy()

    @property
    def id(self) -> str | None:
        return self._state.episode_id

    @property
    def closed(self) -> bool:
        return self._closed

    async def reset(self, *, seed: int | None = None, episode_id: str | None = None,
                    policy: str | None = None, task_id: str | None = None, task: Any = None,
                    **options: Any) -> CodeObservation:
        """Start a new episode on a fresh kernel; `options` are kept in the state.

        With `task_id` (or an inline `task`), the first observation's stdout is the task's prompt
        and `metadata["task"]` its public information; a submit step grades against it.
        """
        async with self._lock:
            self._ensure_open()
            self.last_active = time.monotonic()
            new_task = None
            if task is not None and not isinstance(task, dict | Task):
                options["task"], task = task, None  # a plain value (say, a name): kept as an option
            if task_id is not None or task is not None:
                if self._resolve_task is None:
                    raise EpisodeError("this episode has no task source")
                new_task = self._resolve_task(task_id, task, policy)
                if task_language(new_task) != "python" and self._grade_elsewhere is None:
                    raise TaskError(f"task {new_task.id!r} is in {task_language(new_task)}: this episode grades "
                                    "Python only; grade it with POST /grade (or /run_code, /submit)")
            reserved = RESERVED_STATE_KEYS & set(options)
            if reserved:
                raise InvalidRequestError(f"reset options may not set {', '.join(sorted(reserved))}",
                                          options=sorted(reserved))
            if options and len(json.dumps(options, default=str)) > MAX_OPTIONS_BYTES:
                raise InvalidRequestError(f"reset options take at most {MAX_OPTIONS_BYTES} bytes of JSON "
                                          "(they are part of every state reply)")
            task_fields = {} if new_task is None else {"task_id": new_task.id, "grading": None}
            # Acquire first: a reset that fails (say, an unknown policy) keeps the old episode.
            kernel = await self._acquire(policy)
            if self._closed:  # closed while the kernel was starting: nobody would ever close it
                await kernel.close()
                raise EpisodeClosedError("episode is closed")
            self._ended()
            old, self._kernel = self._kernel, kernel
            if old is not None:  # closing can take tens of ms (container removal): not on the reset path
                self._let_go(old)
            self._kernel_lost = False
            self._done = False
            self.task = new_task
            self._state = EpisodeState(
                episode_id=episode_id or self._id_prefix + str(uuid.uuid4()),
                step_count=0,
                last_exit_code=0,
                backend=self.backend,
                policy=kernel.policy.name,
                seed=seed,
                **options,
                **task_fields,
            )
            self.history.clear()
            self.snapshot, self.running, self.reset_at = None, None, time.time()
            self.samples.clear()
            self.image = getattr(kernel, "image", None)
            self.live.begin()
            self.live.end()  # watchers see the reset
            self.last_active = time.monotonic()
            metadata: dict[str, Any] = {"episode_id": self._state.episode_id, "policy": self._state.policy,
                                        "backend": self.backend}
            if new_task is not None:
                metadata[TASK_KEY] = new_task.public()
            return CodeObservation(stdout=new_task.prompt if new_task else "", reward=0.0, metadata=metadata)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def step(self, action: CodeAction, *, timeout_s: float | None = None) -> CodeObservation:
        """Run the action's code; a step before any reset resets implicitly.

        A requested `timeout_s` can shorten the policy's wall-time limit, never extend it.
        """
        if self._kernel is None and not self._kernel_lost:
            await self.reset()
        async with self._lock:
            self._ensure_open()
            kernel = self._kernel
            if kernel is None:
                raise KernelDiedError("this episode's interpreter was lost; call reset")
            if self._done:  # graded: the feedback may quote hidden tests, so no second attempt
                raise EpisodeClosedError("the episode is done (its submission was graded): call reset")
            self.last_active = time.monotonic()
            if action.submit:
                return await self._submit(kernel, action)
            limit = kernel.policy.timeout_s if timeout_s is None else min(timeout_s, kernel.policy.timeout_s)
            started = time.time()
            self.running = {"step": self._state.step_count + 1, "code": action.code[:RUNNING_CODE_CHARS],
                            "started": started}
            kernel.live = self.live  # the backend writes the step's output here as it arrives
            kernel.snapshot = None  # set again if the step's sandbox sends one
            self.live.begin()
            sampler = asyncio.create_task(self._sample(kernel))
            try:
                result = await kernel.execute(action.code, timeout_s=limit)
            except KernelError:
                self._kernel, self._kernel_lost = None, True
                await kernel.close()
                raise
            finally:
                sampler.cancel()
                self.running = None
                self.live.end()
            self._state.step_count += 1
            self._state.last_exit_code = result.exit_code
            self.last_active = time.monotonic()
            if kernel.snapshot is not None:
                self.snapshot = {"step": self._state.step_count, **kernel.snapshot}
            self.history.append({"step": self._state.step_count, "code": action.code, "started": round(started, 3),
                                 "result": result.model_dump(mode="json")})
            with contextlib.suppress(Exception):
                self.samples.add(await kernel.usage(), force=True)
            return CodeObservation.from_result(result, reward=0.0)

    def submission(self, code: str) -> str:
        """What a submit grades: its own code if any, else every step's code that ran ok, in order."""
        if code.strip():
            return code
        if not self.history.complete:
            raise InvalidRequestError("this episode's step history was capped (too many or too large "
                                      "steps): submit the code itself")
        return "\n".join(h["code"] for h in self.history if h["result"].get("status") == "ok")

    async def _submit(self, kernel: Kernel, action: CodeAction) -> CodeObservation:
        if self.task is None:
            raise EpisodeError("nothing to grade against: reset with task_id=... or task={...} first")
        reward = choose_reward(self.task, None, self._reward)
        if task_language(self.task) != "python" and self._grade_elsewhere is not None:
            # the kernel is the episode's Python scratchpad; the program is graded where its
            # toolchain is (on Docker, the language's own image), as POST /grade grades it
            if not action.code.strip():
                raise InvalidRequestError(f"task {self.task.id!r} is in {task_language(self.task)}: submit the "
                                          "program's code (the episode's steps are Python)")
            grading = await self._grade_elsewhere(self.task, action.code, kernel.policy.name, reward)
        else:
            grading = await grade(kernel, self.task, self.submission(action.code), reward=reward)
        self._state.step_count += 1
        self._state.grading = grading.model_dump(mode="json")  # type: ignore[attr-defined]
        self.last_active = time.monotonic()
        # An infrastructure failure is not the end: the same submission can be graded again.
        done = self._done = grading.status == "graded"
        return CodeObservation(stdout=summary(grading), exit_code=0 if grading.reward == 1.0 else 1,
                               reward=grading.reward, done=done,
                               metadata={GRADING_KEY: grading.model_dump(mode="json"), TASK_KEY: {"id": self.task.id}})

    async def _sample(self, kernel: Kernel) -> None:
        """Resource use while a step runs (cgroup files: the step is not disturbed)."""
        with contextlib.suppress(Exception):
            self.samples.add(await kernel.usage(), force=True)
            while True:
                await asyncio.sleep(SAMPLE_S)
                self.samples.add(await kernel.usage())

    async def inspect(self) -> dict[str, Any]:
        """Everything inspection shows, at once, running step or not, and without sending the
        interpreter anything: the state, the kernel's resource use now (cgroup files), the last
        snapshot of its namespace (taken by the sandbox's trusted code after step `snapshot_step`),
        the running step (its code, elapsed time, output so far), the history and the samples."""
        kernel = self._kernel
        details: dict[str, Any] = {}
        if kernel is not None:
            with contextlib.suppress(Exception):
                details = await kernel.inspect()
        snapshot = self.snapshot or {}
        details["variables"] = snapshot.get("variables", [])
        running = None
        if self.running is not None:
            running = {**self.running, "elapsed_s": round(time.time() - self.running["started"], 3),
                       "output": self.live.text()}
        return {"state": self._state.model_dump(mode="json"), "kernel": details,
                "snapshot_step": snapshot.get("step"), "variables_total": snapshot.get("total", 0),
                "running": running, "history": list(self.history), "samples": list(self.samples.items)}

    def record(self) -> dict[str, Any]:
        """The episode as export needs it (`notebook.py`): who, what, under which limits, its steps."""
        kernel = self._kernel
        policy = kernel.policy if kernel is not None else None
        return {"episode_id": self._state.episode_id, "session_id": self.session_id, "owner": self.owner,
                "backend": self.backend, "policy": self._state.policy,
                "limits": policy.model_dump(mode="json") if policy is not None else None,
                "image": self.image, "task_id": self.task.id if self.task is not None else None,
                "seed": (self._state.model_extra or {}).get("seed"), "created_at": self.created_at, "reset_at": self.reset_at,
                "closed_at": time.time() if self._closed else None, "step_count": self._state.step_count,
                "history_complete": self.history.complete, "history": list(self.history)}

    async def close(self) -> None:
        """Without waiting for the kernel when it goes back to its pool (`release`)."""
        if self._closed:
            return
        self._closed = True
        self._ended()
        kernel, self._kernel = self._kernel, None
        if kernel is not None and not (self._release is not None and self._release(kernel)):
            await kernel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _ended(self) -> None:
        """The episode that was running ends (a reset or the close): its record goes to `on_end`."""
        if self._on_end is not None and self._state.episode_id is not None:
            with contextlib.suppress(Exception):
                self._on_end(self.record())

    def _let_go(self, kernel: Kernel) -> None:
        """Hand a kernel back to its pool, or close it in the background."""
        if self._release is not None and self._release(kernel):
            return
        self._closing.add(asyncio.create_task(kernel.close()))
        self._closing = {t for t in self._closing if not t.done()}

    def _ensure_open(self) -> None:
        if self._closed:
            raise EpisodeClosedError("episode is closed")


def summary(grading: Grading) -> str:
    if grading.status != "graded":
        return f"grading failed for a reason outside the submission ({grading.error}); submit again to retry\n"
    lines = [f"{grading.passed}/{grading.total} tests passed, reward {grading.reward:g}"]
    lines += [f"{t.name}: {t.status.value}{' - ' + t.message.splitlines()[0][:200] if t.message else ''}"
              for t in grading.tests if t.status.value != "passed"][:20]
    return "\n".join(lines) + "\n"
