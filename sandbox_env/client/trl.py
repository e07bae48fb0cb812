"""TRL hooks: `environment_factory` classes with named tools, and reward functions.

The contract, as TRL 1.16's `GRPOTrainer` (and its experimental async GRPO worker) implement it:
the factory is called with no arguments, once per concurrent rollout, and its instances are
reused ("construct once, reset often", never closed); `reset(**row)` is called synchronously with
every dataset column, and a returned string is appended to the last user message as is; every
public *function* on the class except `reset` and `get_reward` becomes a tool (sync, or async: then
it is awaited on TRL's event loop); `get_reward()` (sync or async) is an extra reward source. So
nothing public here may be a plain function unless the model should call it: `close` is not one.

Each instance holds one `/ws` session, so the server needs `--max-sessions` >= TRL's
`generation_batch_size`. Imports only the client, models and errors: no TRL dependency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import types
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

from sandbox_env.client._base import StepResult
from sandbox_env.client.async_client import SandboxEnv
from sandbox_env.client.sync_client import _LoopThread
from sandbox_env.errors import error_from_dict
from sandbox_env.models import CodeAction, CodeObservation, Grading

DEFAULT_URL_VARIABLE = "SANDBOX_ENV_URL"
TOOL_OUTPUT_LIMIT = 8_000  # characters fed back to the model per tool call
PROMPT_SEPARATOR = "\n\n"  # TRL appends reset()'s text to the user message without one

T = TypeVar("T")


def _server_url(explicit: str | None) -> str:
    return explicit or os.environ.get(DEFAULT_URL_VARIABLE, "http://127.0.0.1:8000")


def render(observation: CodeObservation) -> str:
    """What the model sees after a tool call: output, then the outcome when it is not plain ok."""
    text = observation.stdout
    if observation.stderr:
        text += ("\n" if text and not text.endswith("\n") else "") + observation.stderr
    status = observation.status
    if status is not None and status.value != "ok":
        text += f"\n[{status.value}]"
    if len(text) > TOOL_OUTPUT_LIMIT:
        half = TOOL_OUTPUT_LIMIT // 2
        text = f"{text[:half]}\n... [{len(text) - TOOL_OUTPUT_LIMIT} characters cut] ...\n{text[-half:]}"
    return text


def _grading_text(observation: CodeObservation) -> str:
    grading = observation.grading
    if grading is None:
        return render(observation)
    return f"{grading.passed}/{grading.total} tests passed"


class _NotATool:
    """A method TRL does not offer the model: TRL takes every public class attribute that
    `inspect.isfunction` accepts as a tool, and this descriptor is not a function on the class."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self._func = func
        self.__doc__ = func.__doc__

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return self if instance is None else types.MethodType(self._func, instance)


def _stop(loop: _LoopThread) -> None:
    """An instance nobody closed (TRL never does): stop its loop thread when it is collected or
    at exit. The session ends with the socket; closing it politely here could hang an exit."""
    if not loop.loop.is_closed():
        loop.stop()


class _SessionToolEnv:
    """What both factory classes share: one client on a private loop thread, the reset, the reward.

    The connection lives on that thread's loop whoever calls: TRL resets from its main thread
    (or a worker thread) and awaits async tools on its own loop, and a websocket belongs to one loop.
    """

    base_url: ClassVar[str | None] = None
    token: ClassVar[str | None] = None  # None: SANDBOX_ENV_TOKEN
    policy: ClassVar[str | None] = None

    def __init__(self) -> None:
        self._client = SandboxEnv(_server_url(self.base_url), token=self.token)
        self._loop = _LoopThread(name=f"{type(self).__name__}-loop")
        self._finalizer = weakref.finalize(self, _stop, self._loop)
        self.last_grading: Grading | None = None
        self.last_observation: CodeObservation | None = None  # for logging: times, status

    def reset(self, **kwargs: Any) -> str | None:
        """Start a fresh episode; returns the task prompt when the row names a task."""
        options: dict[str, Any] = {}
        for key in ("task_id", "task"):
            if kwargs.get(key) is not None:
                options[key] = kwargs[key]
        if self.policy:
            options["policy"] = self.policy
        self.last_grading = None
        observation = self._loop.call(self._client.reset, **options).observation
        prompt = observation.stdout if "task_id" in options or "task" in options else ""
        return PROMPT_SEPARATOR + prompt if prompt else None

    def get_reward(self) -> float:
        """The reward of the last submission (0.0 before any submission)."""
        if self.last_grading is None or self.last_grading.reward is None:
            return 0.0
        return float(self.last_grading.reward)

    @_NotATool
    def close(self) -> None:
        """End the session and stop the loop thread; calling it twice is harmless."""
        if not self._finalizer.alive:
            return
        try:
            self._loop.call(self._client.close)
        finally:
            self._finalizer()

    def _step(self, action: CodeAction) -> CodeObservation:
        result: StepResult = self._loop.call(self._client.step, action)
        self.last_observation = result.observation
        return result.observation

    async def _step_async(self, action: CodeAction) -> CodeObservation:
        future = self._submit(self._client.step, action)
        self.last_observation = (await asyncio.wrap_future(future)).observation
        return self.last_observation

    def _submit(self, method: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> concurrent.futures.Future[T]:
        async def invoke() -> T:  # called on the loop thread, where dual methods return coroutines
            return await method(*args)

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop.loop)


class SandboxToolEnv(_SessionToolEnv):
    """A TRL `environment_factory` class: tools `run_python` and `submit`, reward from the tests.

    Subclass to point it at a server, or set `SANDBOX_ENV_URL` (and `SANDBOX_ENV_TOKEN`):

        >>> class MyEnv(SandboxToolEnv):  # doctest: +SKIP
        ...     base_url = "http://sandbox-farm:8000"
        >>> GRPOTrainer(..., environment_factory=MyEnv)  # doctest: +SKIP

    Dataset rows with a `task_id` column (or an inline `task`) reset the episode onto that task;
    the task's prompt is returned to TRL, which appends it to the row's user prompt. The tools
    block the calling thread; `AsyncSandboxToolEnv` has the same tools as coroutines.
    """

    def run_python(self, code: str) -> str:
        """Run Python code in a persistent sandboxed interpreter and return its output.

        Args:
            code: Python source to execute. Variables, imports and functions persist between calls.
        """
        return render(self._step(CodeAction(code=code)))

    def submit(self, code: str) -> str:
        """Submit the final solution; it is graded against the task's hidden tests.

        Args:
            code: The complete solution source. Leave empty to submit everything run so far.
        """
        observation = self._step(CodeAction(code=code, submit=True))
        self.last_grading = observation.grading
        return _grading_text(observation)


class AsyncSandboxToolEnv(_SessionToolEnv):
    """`SandboxToolEnv` with async tools: TRL awaits them on its event loop instead of blocking.

    TRL's async GRPO worker then runs many rollouts' tool calls on one loop without a thread
    each; `GRPOTrainer` gathers one rollout's calls of a turn. `reset` stays blocking: TRL calls
    it without awaiting.
    """

    async def run_python(self, code: str) -> str:
        """Run Python code in a persistent sandboxed interpreter and return its output.

        Args:
            code: Python source to execute. Variables, imports and functions persist between calls.
        """
        return render(await self._step_async(CodeAction(code=code)))

    async def submit(self, code: str) -> str:
        """Submit the final solution; it is graded against the task's hidden tests.

        Args:
            code: The complete solution source. Leave empty to submit everything run so far.
        """
        observation = await self._step_async(CodeAction(code=code, submit=True))
        self.last_grading = observation.grading
        return _grading_text(observation)


def code_reward(completions: list[Any], task_id: list[str] | None = None,
                task: list[dict[str, Any]] | None = None, *, base_url: str | None = None,
                policy: str | None = None, token: str | None = None,
                **kwargs: Any) -> list[float | None]:
    """A TRL reward function: grade every completion against its row's task in one request.

    Rows need a `task_id` column (a task the server knows) or a `task` column (inline tasks,
    see docs/tasks.md). Conversational completions
    (`[{"role": "assistant", "content": ...}]`) are reduced to their last message, and a fenced
    code block is taken out of the prose. The whole batch goes to `POST /grade/batch` (in
    chunks of `BATCH_ITEMS`), where identical completions of one task are graded once. Call it
    from synchronous code (TRL does). An infrastructure failure gives `None` ("not applicable"),
    never a 0; a task the server refuses raises. The server's token is `token`, else
    `SANDBOX_ENV_TOKEN`; bind it with `functools.partial` to pass one.
    """
    if task_id is None and task is None:
        raise ValueError("code_reward needs a `task_id` or `task` dataset column")
    targets: list[dict[str, Any]] = ([{"task_id": t} for t in task_id] if task_id is not None
                                     else [{"task": t} for t in task or []])
    items = [{"submission": _completion_text(c), **target} for c, target in zip(completions, targets, strict=True)]
    return asyncio.run(batch_rewards(SandboxEnv(_server_url(base_url), token=token), items, policy=policy))


BATCH_ITEMS = 1024  # the server's default `batch_max_items`


async def batch_rewards(env: SandboxEnv, items: list[dict[str, Any]], *, policy: str | None = None) -> list[float | None]:
    """The reward of each item (`submission` and `task_id` or `task`), in order, graded through
    `env.grade_batch`; None where the sandbox failed."""
    rewards: list[float | None] = [None] * len(items)
    for first in range(0, len(items), BATCH_ITEMS):
        async for line in env.grade_batch(items[first:first + BATCH_ITEMS], policy=policy):
            if line.type == "error" and line.error is not None:
                raise error_from_dict(line.error)
            if line.type == "result" and line.grading is not None and line.index is not None:
                grading = line.grading
                rewards[first + line.index] = grading.reward if grading.status == "graded" else None
    return rewards


async def async_code_reward(completions: list[Any], **kwargs: Any) -> list[float | None]:
    """`code_reward` as a coroutine function: TRL awaits it on its event loop, beside other async
    reward functions, instead of blocking its training thread. Same arguments and results; the
    grading itself runs in a worker thread (`code_reward` runs its own event loop)."""
    return await asyncio.to_thread(code_reward, completions, **kwargs)


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content", "")
    return extract_code(str(completion))


def extract_code(text: str) -> str:
    """The last fenced code block of a model's answer, or the whole text when it has none."""
    fence = "```"
    if text.count(fence) < 2:
        return text
    body = text[: text.rindex(fence)]
    block = body[body.rindex(fence) + len(fence):]
    first_line, _, rest = block.partition("\n")
    # The info string ("python", "py3") is not code; a block without one starts on its first line.
    return rest if first_line.strip().isidentifier() or not first_line.strip() else block
