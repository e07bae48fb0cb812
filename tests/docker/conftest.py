"""Docker backend fixtures. Without a Docker engine these tests skip locally and FAIL in CI (CI=true)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest_asyncio
from docker_helpers import episode_containers, sandbox_policy

from sandbox_env.policy import Policy

KernelFactory = Callable[..., Awaitable[Any]]


@pytest_asyncio.fixture
async def make_kernel(docker_client: Any) -> AsyncIterator[KernelFactory]:
    """Start DockerKernels; each is closed after the test and must leave no container behind."""
    from sandbox_env.kernels.docker.config import DockerConfig
    from sandbox_env.kernels.docker.kernel import DockerKernel

    kernels: list[Any] = []

    async def factory(policy: Policy | None = None, **overrides: Any) -> Any:
        kernel = DockerKernel(policy or sandbox_policy(**overrides), DockerConfig(owner="pytest-docker"))
        kernels.append(kernel)
        await kernel.start()
        return kernel

    yield factory
    for kernel in kernels:
        await kernel.close()
    for kernel in kernels:
        assert episode_containers(docker_client, kernel.kernel_id) == [], "a container outlived its episode"


@pytest_asyncio.fixture
async def kernel(make_kernel: KernelFactory) -> Any:
    return await make_kernel()
