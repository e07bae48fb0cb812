"""Clients for sandbox-env: `SandboxEnv` (async, WebSocket), `SyncSandboxEnv` (blocking wrapper).

This module is also the client module OpenEnv's `AutoEnv` looks up for the env key `sandbox`:
it must expose `SandboxEnv` plus the action and observation classes named in `openenv.yaml`.
Imports only `sandbox_env.models`, `sandbox_env.errors`, websockets and httpx.
"""

from __future__ import annotations

from sandbox_env.client._base import AsyncEnv, StepResult
from sandbox_env.client.async_client import SandboxEnv
from sandbox_env.client.sync_client import SyncSandboxEnv
from sandbox_env.models import CodeAction, CodeObservation, EpisodeState

__all__ = [
    "AsyncEnv",
    "CodeAction",
    "CodeObservation",
    "EpisodeState",
    "SandboxEnv",
    "StepResult",
    "SyncSandboxEnv",
]
