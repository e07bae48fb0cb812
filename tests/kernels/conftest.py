"""Fixtures for the kernel backends: real kernels of each backend, closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from kernel_helpers import BACKENDS, KernelFactory, jupyter_leftovers, test_policy

from sandbox_env.kernels import load_kernel_class
from sandbox_env.kernels.base import Kernel
from sandbox_env.policy import Policy


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def make_kernel(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[KernelFactory]:
    """Start kernels of the parametrized backend; all are closed at the end of the test."""
    if backend == "docker":
        request.getfixturevalue("require_docker")
    cls = load_kernel_class(backend)
    kernels: list[Kernel] = []

    async def factory(policy: Policy | None = None, **overrides: Any) -> Kernel:
        kernel = cls(policy or test_policy(**overrides))
        kernels.append(kernel)
        await kernel.start()
        return kernel

    yield factory
    for kernel in kernels:
        await kernel.close()
    assert [left for k in kernels for left in jupyter_leftovers(k)] == []


@pytest_asyncio.fixture
async def kernel(make_kernel: KernelFactory) -> Kernel:
    return await make_kernel()
