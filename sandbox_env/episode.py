"""One episode: a kernel from the pool, reset/step/state around it, and its step history."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sandbox_env.errors import (
    EpisodeClosedError,
    EpisodeError,
    InvalidRequestError,
    KernelDiedError,
    KernelError,
)
from sandbox_env.grading.driver import choose_reward, grade
from sandbox_env.grading.tasks import Task
from sandbox_env.history import StepHistory
from sandbox_env.kernels.base import Kernel
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
HISTORY_BYTES = 1 << 20  # default budget of one episode's step history (Settings.history_bytes)
# State fields a reset option must not overwrite (a client could otherwise plant a fake grading).
MAX_OPTIONS_BYTES = 4096  # reset options are echoed in every state reply: a small, fixed cost
RESERVED_STATE_KEYS = frozenset(EpisodeState.model_fields) | {"task_id", "grading", "seed"}


class Episode:
    """Reset always takes another kernel, never used or proven clean since its last episode
    (`Kernel.recycle`), so no namespace, file or process survives a reset. A kernel the episode
    is done with goes to `release` (its pool), or without one is closed."""

    def __init__(self, acquire: KernelSource, *, backend: str, tasks: TaskResolver | None = None,
                 reward: str | None = None, owner: str = "", history_bytes: int = HISTORY_BYTES,
                 release: KernelSink | None = None, id_prefix: str = "") -> None:
        self._acquire = acquire
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
        self.last_active = time.monotonic()
        self.history = StepHistory(history_bytes)

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
            try:
                result = await kernel.execute(action.code, timeout_s=limit)
            except KernelError:
                self._kernel, self._kernel_lost = None, True
                await kernel.close()
                raise
            self._state.step_count += 1
            self._state.last_exit_code = result.exit_code
            self.last_active = time.monotonic()
            self.history.append({"step": self._state.step_count, "code": action.code,
                                 "result": result.model_dump(mode="json")})
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
        grading = await grade(kernel, self.task, self.submission(action.code), reward=reward)
        self._state.step_count += 1
        self._state.grading = grading.model_dump(mode="json")  # type: ignore[attr-defined]
        self.last_active = time.monotonic()
        # An infrastructure failure is not the end: the same submission can be graded again.
        done = self._done = grading.status == "graded"
        return CodeObservation(stdout=summary(grading), exit_code=0 if grading.reward == 1.0 else 1,
                               reward=grading.reward, done=done,
                               metadata={GRADING_KEY: grading.model_dump(mode="json"), TASK_KEY: {"id": self.task.id}})

    async def inspect(self) -> dict[str, Any]:
        kernel = self._kernel
        details = await kernel.inspect() if kernel is not None and kernel.is_alive() else {}
        return {"state": self._state.model_dump(mode="json"), "kernel": details,
                "history": list(self.history)}

    async def close(self) -> None:
        """Without waiting for the kernel when it goes back to its pool (`release`)."""
        if self._closed:
            return
        self._closed = True
        kernel, self._kernel = self._kernel, None
        if kernel is not None and not (self._release is not None and self._release(kernel)):
            await kernel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)

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
