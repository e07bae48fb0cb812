"""The backend contract (`sandbox_env.testing`) against every registered backend.

Every check runs on every backend `available_kernels()` names; a check needing a capability the
backend does not declare is skipped, saying why. A backend named like a registered pytest marker
carries that marker (so `-m "not docker"` deselects the Docker runs). A backend that cannot start
a kernel on this machine is skipped (a failure in CI).
"""

from __future__ import annotations

import pytest
from kernel_helpers import jupyter_leftovers, missing

from sandbox_env.errors import KernelError
from sandbox_env.kernels import Kernel, available_kernels, load_kernel_class
from sandbox_env.testing import CHECKS, Check, run_check, small_policy

_UNUSABLE: dict[str, str | None] = {}  # backend -> why it cannot start a kernel here (None: it can)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        markers = {line.split(":", 1)[0].strip() for line in metafunc.config.getini("markers")}
        metafunc.parametrize("backend", [
            pytest.param(name, marks=[getattr(pytest.mark, name)] if name in markers else [])
            for name in available_kernels()])


async def _usable(cls: type[Kernel]) -> None:
    """Start one kernel per backend per session before its first check: skip what cannot run here."""
    if cls.name not in _UNUSABLE:
        kernel = cls(small_policy())
        try:
            await kernel.start()
            _UNUSABLE[cls.name] = None
        except KernelError as exc:
            _UNUSABLE[cls.name] = f"the {cls.name} backend cannot start a kernel here: {exc}"
        finally:
            await kernel.close()
    if _UNUSABLE[cls.name]:
        missing(str(_UNUSABLE[cls.name]))


def _nothing_left(kernel: Kernel) -> None:
    assert jupyter_leftovers(kernel) == []


@pytest.mark.parametrize("check", CHECKS.values(), ids=str)
async def test_contract(backend: str, check: Check) -> None:
    try:
        cls = load_kernel_class(backend)
    except KernelError as exc:
        missing(f"backend {backend}: {exc}")
    reason = check.skip_reason(cls)
    if reason:
        pytest.skip(reason)
    await _usable(cls)
    await run_check(check, cls, after_close=_nothing_left)
