"""TRL hooks: an `environment_factory` class with named tools, and a reward function.

TRL instantiates the factory class once per generation with no arguments, calls `reset(**row)`
with the dataset columns, exposes every public method with an `Args:` docstring as a tool, and
adds `get_reward()` to the reward functions. Each instance holds one `/ws` session, so the server
needs `--max-sessions` >= TRL's `generation_batch_size`.

Imports only the client, models and errors: no TRL dependency.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, ClassVar

from sandbox_env.client.async_client import SandboxEnv
from sandbox_env.client.sync_client import SyncSandboxEnv
from sandbox_env.errors import error_from_dict
from sandbox_env.models import CodeAction, CodeObservation, Grading

DEFAULT_URL_VARIABLE = "SANDBOX_ENV_URL"
TOOL_OUTPUT_LIMIT = 8_000  # characters fed back to the model per tool call


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


class SandboxToolEnv:
    """A TRL `environment_factory` class: tools `run_python` and `submit`, reward from the tests.

    Subclass to point it at a server, or set `SANDBOX_ENV_URL` (and `SANDBOX_ENV_TOKEN`):

        >>> class MyEnv(SandboxToolEnv):  # doctest: +SKIP
        ...     base_url = "http://sandbox-farm:8000"
        >>> GRPOTrainer(..., environment_factory=MyEnv)  # doctest: +SKIP

    Dataset rows with a `task_id` column (or an inline `task`) reset the episode onto that task;
    the task's prompt is returned to TRL as the user prompt.
    """

    base_url: ClassVar[str | None] = None
    token: ClassVar[str | None] = None  # None: SANDBOX_ENV_TOKEN
    policy: ClassVar[str | None] = None

    def __init__(self) -> None:
        self._env: SyncSandboxEnv = SandboxEnv(_server_url(self.base_url), token=self.token).sync()
        self.last_grading: Grading | None = None

    def reset(self, **kwargs: Any) -> str | None:
        """Start a fresh episode; returns the task prompt when the row names a task."""
        options: dict[str, Any] = {}
        for key in ("task_id", "task"):
            if kwargs.get(key) is not None:
                options[key] = kwargs[key]
        if self.policy:
            options["policy"] = self.policy
        self.last_grading = None
        result = self._env.reset(**options)
        return result.observation.stdout or None if options else None

    def run_python(self, code: str) -> str:
        """Run Python code in a persistent sandboxed interpreter and return its output.

        Args:
            code: Python source to execute. Variables, imports and functions persist between calls.
        """
        return render(self._env.step(code).observation)

    def submit(self, code: str) -> str:
        """Submit the final solution; it is graded against the task's hidden tests.

        Args:
            code: The complete solution source. Leave empty to submit everything run so far.
        """
        observation = self._env.step(CodeAction(code=code, submit=True)).observation
        self.last_grading = observation.grading
        grading = self.last_grading
        if grading is None:
            return render(observation)
        return f"{grading.passed}/{grading.total} tests passed"

    def get_reward(self) -> float:
        """The reward of the last submission (0.0 before any submission)."""
        if self.last_grading is None or self.last_grading.reward is None:
            return 0.0
        return float(self.last_grading.reward)

    def close(self) -> None:
        self._env.close()


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
