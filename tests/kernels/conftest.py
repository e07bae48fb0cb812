"""Fixtures for the backend-specific kernel tests: `make_kernel` starts kernels of the backend a
module names with its own `backend` fixture, closed after each test. (The contract every backend
shares is `test_conformance.py`, run by `sandbox_env.testing`.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from kernel_helpers import KernelFactory, jupyter_leftovers, test_policy

from sandbox_env.kernels import load_kernel_class
from sandbox_env.kernels.base import Kernel
from sandbox_env.policy import Policy


@pytest_asyncio.fixture
async def make_kernel(backend: str) -> AsyncIterator[KernelFactory]:
    """Start kernels of the module's backend; all are closed at the end of the test."""
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
