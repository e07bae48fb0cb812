"""The contract every execution backend fulfils: one isolated interpreter for one episode."""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Self

from sandbox_env.errors import KernelUnavailableError
from sandbox_env.models import ExecutionResult
from sandbox_env.policy import Policy


class Kernel(abc.ABC):
    """One isolated, stateful Python interpreter serving exactly one episode.

    `execute` never raises for anything the code does: timeouts, OOM, crashes and floods come
    back as an `ExecutionResult` status. It raises `KernelError` only when the backend itself
    fails. After a `timeout`/`oom`/`killed` result the kernel is usable again (restarted with an
    empty namespace if it had to be killed).
    """

    name: ClassVar[str]

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the interpreter; when this returns, `execute` answers promptly."""

    @abc.abstractmethod
    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        """Run `code`; `timeout_s` defaults to the policy's `timeout_s`."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the interpreter and everything it started; remove its files. Idempotent."""

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """Whether the interpreter can take `execute` calls."""

    async def run_program(self, source: str, *, stdin: bytes = b"", timeout_s: float) -> ExecutionResult:
        """Run `source` as `python3 -I -c source` would, as a fresh process in this kernel's sandbox
        (it may be forked from a pre-warmed interpreter that never ran anything of the episode).

        Every process of the agent is stopped first; the working directory (and /tmp where the
        sandbox has its own) is empty, the environment minimal, the policy's limits apply, `stdin`
        is fed then closed, output is bounded. Nothing of earlier steps or earlier programs is
        visible, so a kernel may serve many programs in a row; the interpreter's namespace is lost.
        Raises `KernelError` only when the backend fails.
        """
        raise KernelUnavailableError(f"the {self.name} backend cannot run programs")

    @classmethod
    async def setup_backend(cls) -> dict[str, Any]:
        """Once per server start: sweep orphans, probe the runtime; returns a report to log."""
        return {}

    @classmethod
    async def teardown_backend(cls) -> None:
        """Once per server shutdown, after every kernel is closed: remove what is left."""

    async def inspect(self) -> dict[str, Any]:
        """Variables and resource use, for the inspection API; backends may override.

        Keys every backend uses: `variables` (a list of `{"name", "type", "repr"}`),
        `memory_mb`, `cpu_time_s`.
        """
        return {}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
