"""Calls that are awaitable inside an event loop and blocking outside one (OpenEnv >= 0.4 habit).

TRL's `environment_factory` code and OpenEnv's own docs call `env.reset()` / `env.step()` without
`await`; AutoEnv hands those callers our client. Outside a running loop such a call runs on a
private loop thread owned by the client, so the connection always lives on one loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sandbox_env.client.sync_client import _LoopThread

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])


class DualMode:
    """Mixin holding the private loop thread that blocking calls run on."""

    _blocking_loop: _LoopThread | None = None

    def _run_blocking(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self._blocking_loop is None:
            self._blocking_loop = _LoopThread(name=f"{type(self).__name__}-blocking")
        return self._blocking_loop.run(coro)

    def _stop_blocking_loop(self) -> None:
        loop, self._blocking_loop = self._blocking_loop, None
        if loop is not None:
            loop.stop()


def dual(method: F) -> F:
    """Return the coroutine inside a running event loop; run it to completion outside one."""

    @functools.wraps(method)
    def wrapper(self: DualMode, *args: Any, **kwargs: Any) -> Any:
        coro = method(self, *args, **kwargs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._run_blocking(coro)
        if self._blocking_loop is not None:
            coro.close()
            raise RuntimeError(f"{type(self).__name__} was first used with blocking calls; "
                               "keep using it that way, or make a new client for async use")
        return coro

    return wrapper  # type: ignore[return-value]
