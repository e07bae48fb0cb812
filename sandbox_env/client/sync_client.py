"""Blocking wrapper around any async env (`SandboxEnv`, `EmbeddedSandboxEnv`).

The async env lives on a private event loop in a daemon thread, so the wrapper works from plain
scripts, from threads, and from code that already runs an event loop (Jupyter, TRL callbacks),
where `asyncio.run` would fail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

from sandbox_env.client._base import ActionLike, AsyncEnv, StepResult
from sandbox_env.models import EpisodeState

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread; coroutines are submitted to it.

    Ours on purpose rather than anyio's blocking portal: the portal lives in a generator context
    manager, and a client its user never closed is then finalized at interpreter exit by calling
    into the portal's thread, which hangs the exit (tests/client: the forgotten-client test)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync env method was called from its own event-loop thread")
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("this sync env is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError as exc:
            raise RuntimeError("the operation was cancelled") from exc

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call `method` on the loop thread and wait for its coroutine's result.

        Calling there, not here, matters: dual-mode methods return a coroutine only when a loop runs.
        """
        async def invoke() -> Any:
            return await method(*args, **kwargs)

        return self.run(invoke())

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _start(method: Callable[..., AsyncIterator[Any]], *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
    """An async generator made on the loop thread (its httpx client binds to that loop)."""
    return method(*args, **kwargs)


class SyncSandboxEnv:
    """Synchronous twin of an async env: same method names, blocking calls.

    Args:
        env: The async env to drive (`SandboxEnv` or `EmbeddedSandboxEnv`). It must not have
            been used from another event loop yet.

    Example:
        >>> from sandbox_env import SandboxEnv
        >>> with SandboxEnv("http://127.0.0.1:8000").sync() as env:  # doctest: +SKIP
        ...     env.reset()
        ...     print(env.step("print(6 * 7)").observation.stdout)
        42
    """

    def __init__(self, env: AsyncEnv) -> None:
        self._env = env
        self._runner = _LoopThread(name=f"{type(env).__name__}-loop")

    @property
    def async_env(self) -> AsyncEnv:
        """The wrapped async env (only usable on this wrapper's loop)."""
        return self._env

    def connect(self) -> SyncSandboxEnv:
        """Open the connection (or start the backend) now instead of at the first call."""
        self._runner.call(self._env.connect)
        return self

    def reset(self, **kwargs: Any) -> StepResult:
        """Start a new episode on a fresh interpreter; see the async env's `reset`."""
        return self._runner.call(self._env.reset, **kwargs)

    def step(self, action: ActionLike, *, timeout_s: float | None = None, **kwargs: Any) -> StepResult:
        """Run code in the episode's interpreter; see the async env's `step`."""
        return self._runner.call(self._env.step, action, timeout_s=timeout_s, **kwargs)

    def state(self) -> EpisodeState:
        """Return the episode's state: id, step count, last exit code, backend and policy."""
        return self._runner.call(self._env.state)

    def grade_batch(self, items: Iterable[Any], **options: Any) -> Iterator[Any]:
        """Grade many submissions in one request; yields each line as it arrives (see the async
        env's `grade_batch`). Leaving the loop early cancels the rest on the server."""
        lines = self._runner.call(_start, self._env.grade_batch, items, **options)
        try:
            while True:
                try:
                    yield self._runner.call(lines.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            if not self._runner.loop.is_closed():
                self._runner.call(lines.aclose)

    def close(self) -> None:
        """Close the env, then stop the loop thread; calling it twice is harmless."""
        if self._runner.loop.is_closed():
            return
        try:
            self._runner.call(self._env.close)
        finally:
            self._runner.stop()

    def __getattr__(self, name: str) -> Any:
        # Other coroutine methods of the async env (e.g. `health`) become blocking calls too.
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._env, name)
        if not asyncio.iscoroutinefunction(inspect.unwrap(attr)):  # unwrap: dual-mode methods
            return attr

        def blocking(*args: Any, **kwargs: Any) -> Any:
            return self._runner.call(attr, *args, **kwargs)

        return blocking

    def __enter__(self) -> SyncSandboxEnv:
        try:
            return self.connect()
        except BaseException:
            self.close()  # no `with` body will run, so nothing else would stop the loop thread
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # Without close() the daemon thread would keep the loop (and its sockets) alive.
        runner = getattr(self, "_runner", None)
        if runner is not None and not runner.loop.is_closed():
            runner.loop.call_soon_threadsafe(runner.loop.stop)
