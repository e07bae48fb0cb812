"""What every client flavour shares: `StepResult`, action coercion and wire-payload parsing.

Imports only `sandbox_env.models`, `sandbox_env.errors` and the standard library, so the remote
client, the in-process client and the sync wrapper agree on one shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from sandbox_env.errors import CapacityError, SandboxEnvError, error_from_dict
from sandbox_env.models import CodeAction, CodeObservation, EpisodeState

ActionLike = CodeAction | dict[str, Any] | str


@dataclass
class StepResult:
    """The outcome of a reset or a step; field names match OpenEnv's `StepResult`.

    Attributes:
        observation: What the execution produced (typed details in `observation.execution`).
        reward: Scalar reward for this step, if the server computes one.
        done: Whether the episode is finished.
        metadata: Extra data sent beside the observation (OpenEnv >= 0.4 top-level `metadata`).
    """

    observation: CodeObservation
    reward: float | None = None
    done: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_observation(cls, observation: CodeObservation) -> StepResult:
        return cls(observation=observation, reward=observation.reward, done=observation.done,
                   metadata=dict(observation.metadata))

    @classmethod
    def from_wire(cls, payload: dict[str, Any]) -> StepResult:
        """Parse the `data` of an `observation` frame (or an HTTP `/step` reply)."""
        observation = CodeObservation.from_wire(payload)
        result = cls.from_observation(observation)
        if payload.get("metadata"):
            result.metadata = dict(payload["metadata"])
        return result


@runtime_checkable
class AsyncEnv(Protocol):
    """The async API that `SandboxEnv` and `EmbeddedSandboxEnv` both implement."""

    async def connect(self) -> Any: ...

    async def reset(self, **kwargs: Any) -> StepResult: ...

    async def step(self, action: ActionLike, *, timeout_s: float | None = None,
                   **kwargs: Any) -> StepResult: ...

    async def state(self) -> EpisodeState: ...

    async def close(self) -> None: ...


def to_action(action: ActionLike, **fields: Any) -> CodeAction:
    """Accept a `CodeAction`, its dict form, or a bare string of code; `fields` override keys.

    >>> to_action("print(1)", metadata={"task": 7})
    CodeAction(code='print(1)', metadata={'task': 7})
    """
    if isinstance(action, CodeAction):
        data = action.model_dump()
    elif isinstance(action, str):
        data = {"code": action}
    elif isinstance(action, dict):
        data = dict(action)
    else:
        raise TypeError(f"action must be a CodeAction, a dict or a str, not {type(action).__name__}")
    if isinstance(action, CodeAction) and not fields:
        return action
    return CodeAction.model_validate({**data, **fields})


TOKEN_VARIABLE = "SANDBOX_ENV_TOKEN"


def auth_headers(token: str | None, headers: dict[str, str] | None = None) -> dict[str, str] | None:
    """`headers` plus `Authorization: Bearer <token>`; `token=None` reads `SANDBOX_ENV_TOKEN`,
    `token=""` sends none, and an Authorization header already in `headers` wins.

    >>> auth_headers("abc", {"x-trace": "1"})
    {'x-trace': '1', 'Authorization': 'Bearer abc'}
    """
    if token is None:
        token = os.environ.get(TOKEN_VARIABLE, "")
    merged = dict(headers or {})
    if token and not any(key.lower() == "authorization" for key in merged):
        merged["Authorization"] = f"Bearer {token}"
    return merged or None


def ws_url(base_url: str) -> str:
    """Turn `http(s)://host:port[/prefix]` into `ws(s)://host:port[/prefix]/ws`."""
    parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"unsupported URL scheme in {base_url!r}; use http(s):// or ws(s)://")
    path = parts.path.rstrip("/")
    if not path.endswith("/ws"):
        path = f"{path}/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def http_url(base_url: str) -> str:
    """The HTTP root matching `base_url` (for `/health`), whatever scheme it was given in."""
    parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    path = path.removesuffix("/ws")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def error_from_frame(data: dict[str, Any]) -> SandboxEnvError:
    """Map an error frame's `data` to the matching exception class.

    OpenEnv's protocol codes (`INVALID_JSON`, `VALIDATION_ERROR`, ...) have no class of their own
    and come back as `SandboxEnvError` carrying that code in `.details["wire_code"]`.
    """
    code = str(data.get("code", ""))
    if code.upper() == "CAPACITY_REACHED":
        return CapacityError(int(data.get("active_sessions", 0)), int(data.get("max_sessions", 0)))
    # Our server refines OpenEnv's generic code with one of ours (e.g. kernel_died) in `error_code`.
    refined = data.get("error_code")
    err = error_from_dict({**data, "code": refined} if isinstance(refined, str) else data)
    if type(err) is SandboxEnvError and code:
        err.details.setdefault("wire_code", code)
    return err
