"""Grading fixtures: real Docker kernels (skip without an engine, fail in CI) and task builders."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docker"))
from docker_helpers import sandbox_policy


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def grader_kernel(docker_client: Any) -> AsyncIterator[Any]:
    """ONE warm kernel graded on again and again: every test also checks the clean slate."""
    from sandbox_env.kernels.docker.config import DockerConfig
    from sandbox_env.kernels.docker.kernel import DockerKernel

    kernel = DockerKernel(sandbox_policy(timeout_s=5), DockerConfig(owner="pytest-grading"))
    await kernel.start()
    yield kernel
    await kernel.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def jupyter_kernel() -> AsyncIterator[Any]:
    """ONE jupyter kernel per module, graded on again and again (the grading tests' other backend)."""
    pytest.importorskip("ipykernel")
    from sandbox_env.kernels.jupyter.kernel import JupyterKernel

    kernel = JupyterKernel(sandbox_policy(timeout_s=5))
    await kernel.start()
    yield kernel
    await kernel.close()
