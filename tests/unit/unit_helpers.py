"""Helpers of the unit layer: the episode, the manager and the pool on the in-process fake backend
(no server, no real kernel), so each test takes milliseconds. A `KernelSource` hands out fake
kernels and remembers them, so a test can check what was closed."""

from __future__ import annotations

from typing import Any

from sandbox_env.kernels.fake import FakeKernel
from sandbox_env.testing import small_policy


class KernelSource:
    """An Episode's `acquire`: a started fake kernel per call, recorded in `handed`."""

    def __init__(self, timeout_s: float = 0.5) -> None:
        self.timeout_s = timeout_s  # the policy's step limit
        self.handed: list[FakeKernel] = []
        self.fail: BaseException | None = None  # raised by the next call instead

    async def __call__(self, policy: str | None = None) -> FakeKernel:
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        kernel = FakeKernel(small_policy(name=policy or "unit", timeout_s=self.timeout_s))
        await kernel.start()
        self.handed.append(kernel)
        return kernel


def fake_settings(**overrides: Any) -> Any:
    """Settings of a manager on the fake backend: tiny pool, no reaper unless asked."""
    from sandbox_env.settings import Settings

    fields: dict[str, Any] = {"backend": "fake", "pool_size": 1, "session_timeout_s": None, "reaper": False}
    return Settings(**{**fields, **overrides})
