"""Grading fixtures: real Docker kernels (skip without an engine, fail in CI) and task builders."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docker"))
from docker_helpers import sandbox_policy

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"Docker is required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
        from sandbox_env.kernels.docker import default_image

        client.images.get(default_image())
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable engine"
        _unavailable(f"no Docker engine or image: {exc}")
    return client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def grader_kernel(docker_client: Any) -> AsyncIterator[Any]:
    """ONE warm kernel graded on again and again: every test also checks the clean slate."""
    from sandbox_env.kernels.docker import DockerKernel

    kernel = DockerKernel(sandbox_policy(timeout_s=5), owner="pytest-grading")
    await kernel.start()
    yield kernel
    await kernel.close()
