"""sandbox-env: sandboxed Python episodes for training and evaluating code models.

`import sandbox_env` loads only the client side (models, errors, client): no FastAPI, docker or
jupyter_client.
"""

from __future__ import annotations

from typing import Any

from sandbox_env._version import __version__
from sandbox_env.client import SandboxEnv, StepResult, SyncSandboxEnv
from sandbox_env.errors import CapacityError, ClientError, ConnectionLostError, KernelError, SandboxEnvError
from sandbox_env.models import (
    CodeAction,
    CodeObservation,
    EpisodeState,
    ExceptionInfo,
    ExecStatus,
    ExecutionResult,
)

__all__ = [
    "CapacityError",
    "ClientError",
    "ConnectionLostError",
    "CodeAction",
    "CodeObservation",
    "EmbeddedSandboxEnv",
    "EpisodeState",
    "ExceptionInfo",
    "ExecStatus",
    "ExecutionResult",
    "KernelError",
    "SandboxEnv",
    "SandboxEnvError",
    "StepResult",
    "SyncSandboxEnv",
    "__version__",
    "evaluate",
]


def __getattr__(name: str) -> Any:
    # The in-process mode needs the server-side stack; import it only when asked for.
    if name == "EmbeddedSandboxEnv":
        from sandbox_env.embedded import EmbeddedSandboxEnv

        return EmbeddedSandboxEnv
    if name == "evaluate":  # the evaluation harness also needs the server-side stack
        from sandbox_env.evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'sandbox_env' has no attribute {name!r}")
