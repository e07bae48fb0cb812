"""The machinery of the conformance suite: checks, the capabilities they need, a harness that
starts and closes kernels, and `check_backend`, which runs them all and reports.

A check is an async function of a `Harness`, registered with `@check(*capabilities)`; it fails by
raising (plain `assert`s). It is skipped, with the reason, for a backend whose `capabilities` lack
one it needs (see `sandbox_env.kernels.base.CAPABILITIES`).
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from sandbox_env.kernels.base import CAPABILITIES, Kernel
from sandbox_env.kernels.registry import load_kernel_class
from sandbox_env.policy import Policy

CHECK_TIMEOUT_S = 120.0  # generous: a loaded 2-core machine starts a real kernel in seconds
AfterClose = Callable[[Kernel], None]  # asserts nothing of a closed kernel is left (backend-specific)


def small_policy(**overrides: Any) -> Policy:
    """The checks' base policy: small limits, so every limit check is quick."""
    fields: dict[str, Any] = {
        "name": "conformance", "timeout_s": 3, "memory_mb": 256, "pids": 32, "cpus": 1.0, "open_files": 256,
        "file_size_mb": 16, "output_bytes": 16_384, "output_limit_bytes": 2_000_000, "interrupt_grace_s": 1.0,
    }
    return Policy(**{**fields, **overrides})


class Harness:
    """Starts kernels of one backend for one check (the base policy with a check's overrides) and
    closes every one of them at the end."""

    def __init__(self, kernel_class: type[Kernel], policy: Policy, after_close: AfterClose | None = None) -> None:
        self.kernel_class, self.policy, self.after_close = kernel_class, policy, after_close
        self.kernels: list[Kernel] = []

    async def kernel(self, **overrides: Any) -> Kernel:
        """A started kernel whose policy is the base one with `overrides` (e.g. `timeout_s=2`)."""
        policy = self.policy.model_copy(update=overrides) if overrides else self.policy
        kernel = self.kernel_class(policy)
        self.kernels.append(kernel)
        await kernel.start()
        return kernel

    async def close(self) -> None:
        results = await asyncio.gather(*(k.close() for k in self.kernels), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        for kernel in self.kernels:
            if self.after_close is not None:
                self.after_close(kernel)


@dataclass(frozen=True)
class Check:
    """One behaviour of the contract; `requires` names the capabilities it needs."""

    name: str
    run: Callable[[Harness], Awaitable[None]]
    requires: frozenset[str] = frozenset()
    doc: str = ""

    def skip_reason(self, backend: str | type[Kernel]) -> str | None:
        """Why `backend` is exempt from this check (it declares not having what it needs), or None."""
        cls = kernel_class(backend)
        missing = sorted(self.requires - cls.capabilities)
        if not missing:
            return None
        return f"the {cls.name} backend does not declare " + "; ".join(f"{m} ({CAPABILITIES[m]})" for m in missing)

    def __str__(self) -> str:
        return self.name


CHECKS: dict[str, Check] = {}


def register(name: str, run: Callable[[Harness], Awaitable[None]], requires: Iterable[str] = (),
             doc: str = "") -> Check:
    unknown = set(requires) - set(CAPABILITIES)
    if unknown or name in CHECKS:
        raise ValueError(f"check {name!r}: duplicate name or unknown capabilities {sorted(unknown)}")
    CHECKS[name] = Check(name, run, frozenset(requires), doc)
    return CHECKS[name]


def check(*requires: str) -> Callable[[Callable[[Harness], Awaitable[None]]], Callable[[Harness], Awaitable[None]]]:
    """Register the decorated function as a check named after it, needing `requires`."""
    def decorate(fn: Callable[[Harness], Awaitable[None]]) -> Callable[[Harness], Awaitable[None]]:
        register(fn.__name__, fn, requires, (fn.__doc__ or "").strip())
        return fn
    return decorate


def kernel_class(backend: str | type[Kernel]) -> type[Kernel]:
    return load_kernel_class(backend) if isinstance(backend, str) else backend


class CheckSkipped(Exception):
    """The backend does not declare a capability the check needs."""


async def run_check(item: Check | str, backend: str | type[Kernel], *, policy: Policy | None = None,
                    after_close: AfterClose | None = None) -> None:
    """Run one check on fresh kernels of `backend`; raises AssertionError (or the error the backend
    raised) when it fails, `CheckSkipped` when the backend is exempt."""
    chosen = CHECKS[item] if isinstance(item, str) else item
    reason = chosen.skip_reason(backend)
    if reason is not None:
        raise CheckSkipped(reason)
    harness = Harness(kernel_class(backend), policy or small_policy(), after_close)
    try:
        await asyncio.wait_for(chosen.run(harness), CHECK_TIMEOUT_S)
    finally:
        await harness.close()


@dataclass
class Outcome:
    name: str
    status: Literal["passed", "failed", "skipped"]
    detail: str = ""


@dataclass
class Report:
    """What `check_backend` found: one outcome per check, in the suite's order."""

    backend: str
    outcomes: list[Outcome] = field(default_factory=list)

    def _named(self, status: str) -> list[str]:
        return [o.name for o in self.outcomes if o.status == status]

    @property
    def passed(self) -> list[str]:
        return self._named("passed")

    @property
    def failed(self) -> list[str]:
        return self._named("failed")

    @property
    def skipped(self) -> list[str]:
        return self._named("skipped")

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        head = (f"backend {self.backend}: {len(self.passed)} passed, {len(self.failed)} failed, "
                f"{len(self.skipped)} skipped")
        lines = [f"  {o.status.upper()} {o.name}: {o.detail}" for o in self.outcomes if o.status != "passed"]
        return "\n".join([head, *lines])


class ContractError(AssertionError):
    """A backend failed checks of the contract; `report` says which and why."""

    def __init__(self, report: Report) -> None:
        super().__init__(str(report))
        self.report = report


async def check_backend_async(backend: str | type[Kernel], *, policy: Policy | None = None,
                              only: Iterable[str] | None = None, after_close: AfterClose | None = None,
                              raise_on_failure: bool = True) -> Report:
    """Run every check (or those named in `only`) on `backend`, one after another."""
    cls = kernel_class(backend)
    names = list(CHECKS) if only is None else list(only)
    report = Report(cls.name)
    for name in names:
        try:
            await run_check(name, cls, policy=policy, after_close=after_close)
        except CheckSkipped as exc:
            report.outcomes.append(Outcome(name, "skipped", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a failing check is reported, the others still run
            report.outcomes.append(Outcome(name, "failed", _describe(exc)))
        else:
            report.outcomes.append(Outcome(name, "passed"))
    if raise_on_failure and report.failed:
        raise ContractError(report)
    return report


def _describe(exc: BaseException) -> str:
    """The error, and the line of the check that raised it (a bare assert has no message)."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "sandbox_env/testing" in f.filename.replace("\\", "/")]
    if ours:
        text += f" at {ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}: {ours[-1].line}"
    return text


def check_backend(backend: str | type[Kernel], **options: Any) -> Report:
    """`check_backend_async` for code outside an event loop (a plain test function, a script)."""
    return asyncio.run(check_backend_async(backend, **options))
