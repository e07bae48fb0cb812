"""In-process env: the `SandboxEnv` API on a local `EpisodeManager`, with no server and no network."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from sandbox_env.client import StepResult, SyncSandboxEnv
from sandbox_env.client._base import ActionLike, to_action
from sandbox_env.episode import Episode
from sandbox_env.manager import EpisodeManager
from sandbox_env.models import CodeObservation, EpisodeState, Grading, ResetRequest
from sandbox_env.settings import Settings


class EmbeddedSandboxEnv:
    """Same methods and results as `SandboxEnv`, executed by a backend in this process.

    Observations go through the same wire encoding as the server's replies, so code written
    against the embedded env behaves identically against a remote one.

    Args:
        backend: Execution backend (`jupyter`, `docker`, or a plugin name).
        policy: Resource policy applied to the episode unless `reset(policy=...)` names another.
        **settings_overrides: Any other `Settings` field, e.g. `pool_size=0` for a one-shot run.
            Fields not given come from `SANDBOX_ENV_*` variables, then defaults; `pool_size`
            defaults to 1 here (one kernel warming for the next reset), and `allowed_policies` to
            every installed policy.

    Example:
        >>> async with EmbeddedSandboxEnv() as env:  # doctest: +SKIP
        ...     await env.reset()
        ...     result = await env.step("import math; print(math.pi)")
        >>> result.observation.stdout  # doctest: +SKIP
        '3.141592653589793\\n'
    """

    def __init__(self, backend: str = "jupyter", policy: str = "default", **settings_overrides: Any) -> None:
        settings_overrides.setdefault("pool_size", 1)
        settings_overrides.setdefault("allowed_policies", ["*"])  # in-process: the caller is the operator
        self.settings = Settings(backend=backend, policy=policy, **settings_overrides)
        self._manager: EpisodeManager | None = None
        self._episode: Episode | None = None
        self._starting = asyncio.Lock()  # two first calls racing must not start two managers

    async def connect(self) -> EmbeddedSandboxEnv:
        """Start the backend and open the episode's session (done implicitly by the first call)."""
        await self._ensure_episode()
        return self

    async def reset(self, **kwargs: Any) -> StepResult:
        """Start a new episode on a fresh interpreter; kwargs are reset options (e.g. `policy`)."""
        # Validated like the server's reset frame, so bad options fail here exactly as remotely.
        options = ResetRequest.model_validate(kwargs).reset_kwargs()
        episode = await self._ensure_episode()
        return _as_result(await episode.reset(**options))

    async def step(self, action: ActionLike, *, timeout_s: float | None = None, **kwargs: Any) -> StepResult:
        """Run code in the episode's interpreter.

        Args:
            action: A `CodeAction`, its dict form, or a string of code.
            timeout_s: Wall-time limit of this step; defaults to the policy's.
            **kwargs: Extra action fields, e.g. `metadata={...}`; unknown fields are rejected.
        """
        episode = await self._ensure_episode()
        return _as_result(await episode.step(to_action(action, **kwargs), timeout_s=timeout_s))

    async def state(self) -> EpisodeState:
        """The episode's id, step count, last exit code, backend and policy."""
        episode = await self._ensure_episode()
        # Round-trip through JSON like the server does, so extra reset options look the same.
        return EpisodeState.model_validate(episode.state.model_dump(mode="json"))

    async def grade(self, submission: str, *, task: Any = None, task_id: str | None = None,
                    policy: str | None = None, reward: str | None = None) -> Grading:
        """Grade `submission` against a task without an episode (same as `SandboxEnv.grade`)."""
        await self._ensure_episode()
        assert self._manager is not None
        resolved = self._manager.resolve_task(task_id, task, policy)
        return await self._manager.grade(resolved, submission, policy=policy, reward=reward)

    async def close(self) -> None:
        """End the episode and stop every kernel this env started; calling it twice is harmless."""
        manager, episode = self._manager, self._episode
        self._manager = self._episode = None
        if manager is None:
            return
        try:
            if episode is not None:
                await manager.close_episode(episode)
        finally:
            await manager.shutdown()

    def sync(self) -> SyncSandboxEnv:
        """A blocking wrapper with the same methods, driving this env on its own loop thread."""
        return SyncSandboxEnv(self)

    async def __aenter__(self) -> EmbeddedSandboxEnv:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.settings.backend!r}, policy={self.settings.policy!r})"

    async def _ensure_episode(self) -> Episode:
        async with self._starting:
            if self._episode is not None:
                return self._episode
            manager = EpisodeManager(self.settings)
            try:
                await manager.start()
                episode = await manager.open_episode()
            except BaseException:
                await manager.shutdown()
                raise
            self._manager, self._episode = manager, episode
            return episode


def _as_result(observation: CodeObservation) -> StepResult:
    # The same encoding as a server reply: what callers see does not depend on the transport.
    return StepResult.from_wire(observation.to_wire())
