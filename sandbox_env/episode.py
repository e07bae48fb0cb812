"""One episode: a kernel from the pool, reset/step/state around it, and its step history."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from sandbox_env.errors import EpisodeClosedError, KernelDiedError, KernelError
from sandbox_env.kernels.base import Kernel
from sandbox_env.models import CodeAction, CodeObservation, EpisodeState

# (policy name or None for the default) -> a started, never-used kernel
KernelSource = Callable[[str | None], Awaitable[Kernel]]
HISTORY_LIMIT = 100


class Episode:
    """Reset always takes a fresh kernel, so no namespace, file or process survives a reset."""

    def __init__(self, acquire: KernelSource, *, backend: str) -> None:
        self._acquire = acquire
        self.backend = backend
        self._kernel: Kernel | None = None
        self._lock = asyncio.Lock()
        self._state = EpisodeState(backend=backend)
        self._kernel_lost = False
        self._closed = False
        self.created_at = time.time()
        self.last_active = time.monotonic()
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LIMIT)

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
                    policy: str | None = None, **options: Any) -> CodeObservation:
        """Start a new episode on a fresh kernel; `options` are kept in the state."""
        async with self._lock:
            self._ensure_open()
            old, self._kernel = self._kernel, None
            if old is not None:
                await old.close()
            self._kernel = await self._acquire(policy)
            self._kernel_lost = False
            self._state = EpisodeState(
                episode_id=episode_id or str(uuid.uuid4()),
                step_count=0,
                last_exit_code=0,
                backend=self.backend,
                policy=self._kernel.policy.name,
                seed=seed,
                **options,
            )
            self.history.clear()
            self.last_active = time.monotonic()
            return CodeObservation(reward=0.0, metadata={"episode_id": self._state.episode_id,
                                                         "policy": self._state.policy,
                                                         "backend": self.backend})

    async def step(self, action: CodeAction, *, timeout_s: float | None = None) -> CodeObservation:
        """Run the action's code; a step before any reset resets implicitly."""
        if self._kernel is None and not self._kernel_lost:
            await self.reset()
        async with self._lock:
            self._ensure_open()
            kernel = self._kernel
            if kernel is None:
                raise KernelDiedError("this episode's interpreter was lost; call reset")
            try:
                result = await kernel.execute(action.code, timeout_s=timeout_s)
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

    async def inspect(self) -> dict[str, Any]:
        kernel = self._kernel
        details = await kernel.inspect() if kernel is not None and kernel.is_alive() else {}
        return {"state": self._state.model_dump(mode="json"), "kernel": details,
                "history": list(self.history)}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        kernel, self._kernel = self._kernel, None
        if kernel is not None:
            await kernel.close()

    def _ensure_open(self) -> None:
        if self._closed:
            raise EpisodeClosedError("episode is closed")
