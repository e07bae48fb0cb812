"""Helpers shared by the Docker test modules: a small policy and container lookups by label."""

from __future__ import annotations

from typing import Any

from sandbox_env.policy import Policy


def sandbox_policy(**overrides: Any) -> Policy:
    """Small limits so that every limit test is quick."""
    fields: dict[str, Any] = {
        "name": "test", "timeout_s": 3, "memory_mb": 256, "pids": 32, "cpus": 1.0, "open_files": 128,
        "file_size_mb": 16, "output_bytes": 16_384, "output_limit_bytes": 4_000_000, "workspace_mb": 64,
        "tmp_mb": 16,
    }
    fields.update(overrides)
    return Policy(**fields)


def episode_containers(client: Any, kernel_id: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"sandbox-env.episode={kernel_id}"})
