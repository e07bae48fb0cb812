"""`sandbox_env.testing` itself: capability skips, reports, failures, and the registry of checks.
(The whole suite runs on every backend in tests/kernels/test_conformance.py.)"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from sandbox_env.kernels.base import ALL_CAPABILITIES, CAPABILITIES, Kernel
from sandbox_env.kernels.fake import FakeKernel
from sandbox_env.models import ExecutionResult
from sandbox_env.testing import (
    CHECKS,
    CheckSkipped,
    ContractError,
    Harness,
    check_backend,
    check_backend_async,
    register,
    run_check,
    small_policy,
)

QUICK = ["prints", "exception", "memory_hog", "program_stdin_and_isolated_mode"]


class Forgetful(FakeKernel):
    """Breaks the contract: every step reports exit code 0, even when the code raised."""

    name = "forgetful"

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        result = await super().execute(code, timeout_s=timeout_s)
        return result.model_copy(update={"exit_code": 0})


class Boasting(FakeKernel):
    """Claims a capability it does not have: the suite holds it to it."""

    name = "boasting"
    capabilities: ClassVar[frozenset[str]] = frozenset({"isolation"})


def test_real_backends_claim_the_whole_contract_by_default() -> None:
    assert Kernel.capabilities == ALL_CAPABILITIES == frozenset(CAPABILITIES)


def test_every_capability_is_needed_by_some_check() -> None:
    assert set().union(*(c.requires for c in CHECKS.values())) == ALL_CAPABILITIES
    assert {"program_exit_statuses", "grading_function_tests", "grading_stdio_tests"} <= set(CHECKS)


def test_skips_name_the_missing_capability() -> None:
    hog = CHECKS["memory_hog"]
    assert hog.skip_reason("fake") == f"the fake backend does not declare memory_limit ({CAPABILITIES['memory_limit']})"
    assert hog.skip_reason(Kernel) is None and CHECKS["prints"].skip_reason("fake") is None


def test_a_report_of_a_conforming_backend() -> None:
    report = check_backend("fake", only=QUICK)  # outside an event loop: the sync form
    assert report.ok and report.passed == ["prints", "exception", "program_stdin_and_isolated_mode"]
    assert report.skipped == ["memory_hog"] and report.failed == []
    assert str(report).splitlines()[0] == "backend fake: 3 passed, 0 failed, 1 skipped"
    assert "SKIPPED memory_hog: the fake backend does not declare memory_limit" in str(report)


async def test_a_broken_backend_is_reported() -> None:
    with pytest.raises(ContractError) as info:
        await check_backend_async(Forgetful, only=QUICK)
    report = info.value.report
    assert report.failed == ["exception"] and "prints" in report.passed
    detail = next(o.detail for o in report.outcomes if o.name == "exception")
    assert detail.startswith("AssertionError") and "checks.py" in detail and "result.exit_code" in detail
    quiet = await check_backend_async(Forgetful, only=["exception"], raise_on_failure=False)
    assert not quiet.ok and "FAILED exception" in str(quiet)


async def test_a_claimed_capability_is_checked() -> None:
    report = await check_backend_async(Boasting, only=["server_env_invisible"], raise_on_failure=False)
    assert report.failed == ["server_env_invisible"]  # the host's environment is right there


async def test_run_check_skips_and_hooks() -> None:
    with pytest.raises(CheckSkipped, match="memory_limit"):
        await run_check("memory_hog", FakeKernel)
    closed: list[Kernel] = []
    await run_check(CHECKS["state_persists"], "fake", after_close=closed.append)
    assert len(closed) == 1 and not closed[0].is_alive()


async def test_the_harness_applies_overrides_and_closes_everything() -> None:
    harness = Harness(FakeKernel, small_policy())
    kernel = await harness.kernel(timeout_s=1.5)
    assert kernel.policy.timeout_s == 1.5 and kernel.policy.name == "conformance"
    await harness.close()
    assert not kernel.is_alive()


def test_registering_checks() -> None:
    async def nothing(h: Harness) -> Any:
        return None

    with pytest.raises(ValueError, match="unknown capabilities"):
        register("needs_wings", nothing, ["wings"])
    with pytest.raises(ValueError, match="duplicate"):
        register("prints", nothing)
