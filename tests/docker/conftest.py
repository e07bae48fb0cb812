"""Docker backend fixtures. Without a Docker engine these tests skip locally and FAIL in CI (CI=true)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
from docker_helpers import episode_containers, sandbox_policy

from sandbox_env.policy import Policy

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
KernelFactory = Callable[..., Awaitable[Any]]


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"Docker is required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable engine"
        _unavailable(f"no Docker engine: {exc}")
    from sandbox_env.kernels.docker import default_image

    try:
        client.images.get(default_image())
    except Exception:  # noqa: BLE001
        _unavailable(f"image {default_image()} missing: run `sandbox-env images build` or .ci/docker-setup.sh")
    yield client


@pytest_asyncio.fixture
async def make_kernel(docker_client: Any) -> AsyncIterator[KernelFactory]:
    """Start DockerKernels; each is closed after the test and must leave no container behind."""
    from sandbox_env.kernels.docker import DockerKernel

    kernels: list[Any] = []

    async def factory(policy: Policy | None = None, **overrides: Any) -> Any:
        kernel = DockerKernel(policy or sandbox_policy(**overrides), owner="pytest-docker")
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
