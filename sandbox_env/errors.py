"""Exceptions for failures of the *service*; code the model wrote failing is data, not an exception.

Each class carries its wire mapping (`code`, `http_status`). Imports only the standard library.
"""

from __future__ import annotations

from typing import Any, ClassVar

MAX_MESSAGE = 2000  # characters of a message kept: it may quote a client's input, and is logged


def clip_message(message: str) -> str:
    """`message` cut to MAX_MESSAGE characters, saying so."""
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + " [...]"


class SandboxEnvError(Exception):
    """Root of every sandbox-env exception."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", **details: Any) -> None:
        self.message = clip_message(message or self.__class__.__doc__ or self.code)
        self.details = details
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "code": self.code, **self.details}


class ConfigError(SandboxEnvError):
    """Settings or a policy file are invalid."""

    code = "config_error"
    http_status = 500


class PolicyNotFoundError(ConfigError):
    """No policy by that name."""

    code = "policy_not_found"
    http_status = 422


class UnknownKernelError(ConfigError):
    """No execution backend by that name."""

    code = "unknown_kernel"
    http_status = 422


class TaskError(ConfigError):
    """The task data is invalid (the message names the field)."""

    code = "invalid_task"
    http_status = 422


class LanguageUnavailableError(SandboxEnvError):
    """A language this server does not know, or whose toolchain its sandboxes lack (the message
    says how to add it: the image's build command, or the host's apt package)."""

    code = "language_unavailable"
    http_status = 422


class TaskNotFoundError(SandboxEnvError):
    """No task with that id on this server."""

    code = "task_not_found"
    http_status = 404


class KernelError(SandboxEnvError):
    """The execution backend failed; the episode's interpreter is lost."""

    code = "kernel_error"
    http_status = 502
    retryable = True


class KernelUnavailableError(KernelError):
    """The backend cannot be used here (not installed, daemon down)."""

    code = "kernel_unavailable"
    http_status = 503


class KernelStartError(KernelError):
    """A new interpreter could not be started."""

    code = "kernel_start_failed"


class KernelDiedError(KernelError):
    """The interpreter died for a reason that is not the code's own."""

    code = "kernel_died"


class InvalidRequestError(SandboxEnvError):
    """A request's options are not acceptable."""

    code = "invalid_request"
    http_status = 422


class EpisodeError(SandboxEnvError):
    """Misuse of an episode."""

    code = "episode_error"
    http_status = 409


class EpisodeNotFoundError(EpisodeError):
    """No live episode with that id."""

    code = "episode_not_found"
    http_status = 404


class EpisodeClosedError(EpisodeError):
    """The episode is closed or was never reset."""

    code = "episode_closed"
    http_status = 409


class CapacityError(SandboxEnvError):
    """Every session slot is taken."""

    code = "capacity_reached"
    http_status = 503
    retryable = True

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(
            f"Server at capacity: {active}/{limit} sessions active. Retry later.",
            active_sessions=active,
            max_sessions=limit,
        )
        self.active, self.limit = active, limit


class AuthError(SandboxEnvError):
    """No valid token: send `Authorization: Bearer <token>` (or set SANDBOX_ENV_TOKEN)."""

    code = "unauthorized"
    http_status = 401


class ForbiddenError(SandboxEnvError):
    """The request came from a place the server does not serve (Host, Origin) or asked for
    something its token may not touch."""

    code = "forbidden"
    http_status = 403


class QuotaError(CapacityError):
    """This token has used its share of the server (sessions or concurrent gradings)."""

    code = "quota_exceeded"
    http_status = 429

    def __init__(self, what: str, used: int, limit: int) -> None:
        SandboxEnvError.__init__(
            self, f"Quota reached: {used}/{limit} {what} for this token. Retry later.",
            quota=what, active_sessions=used, max_sessions=limit)
        self.what, self.active, self.limit = what, used, limit


class DrainingError(CapacityError):
    """The server is shutting down: it takes no new sessions."""

    code = "draining"
    http_status = 503

    def __init__(self, active: int = 0, limit: int = 0) -> None:
        SandboxEnvError.__init__(self, "The server is shutting down; retry on another instance or later.",
                                 active_sessions=active, max_sessions=limit)
        self.active, self.limit = active, limit


class ClientError(SandboxEnvError, ConnectionError):
    """The client could not reach the server or the server answered with an error frame."""

    code = "client_error"


class ConnectionLostError(ClientError):
    """The connection to the server closed before the reply came (say, a farm replica was killed):
    the episode is gone with it; reset() starts a new one, on a server (or replica) that is up."""

    code = "connection_lost"
    retryable = True


_BY_CODE: dict[str, type[SandboxEnvError]] = {
    cls.code: cls
    for cls in (
        SandboxEnvError, ConfigError, PolicyNotFoundError, UnknownKernelError, KernelError,
        KernelUnavailableError, KernelStartError, KernelDiedError, EpisodeError,
        EpisodeNotFoundError, EpisodeClosedError, ClientError, ConnectionLostError, InvalidRequestError, TaskError,
        TaskNotFoundError, AuthError, ForbiddenError,
    )
}


def error_from_dict(data: dict[str, Any]) -> SandboxEnvError:
    """Rebuild an exception from its wire form; unknown codes, and details that do not fit the
    code's class (a malformed reply), become `SandboxEnvError` with the message kept."""
    code = str(data.get("code", ""))
    message = str(data.get("message", "unknown error"))
    details = {k: v for k, v in data.items() if k not in ("code", "message")}
    try:
        return _typed_error(code, message, details)
    except (TypeError, ValueError):
        error = SandboxEnvError(message)
        error.details = {**details, "wire_code": code}
        return error


def _typed_error(code: str, message: str, details: dict[str, Any]) -> SandboxEnvError:
    if code in ("capacity_reached", "CAPACITY_REACHED"):
        return CapacityError(int(details.get("active_sessions", 0)), int(details.get("max_sessions", 0)))
    if code == DrainingError.code:
        return DrainingError(int(details.get("active_sessions", 0)), int(details.get("max_sessions", 0)))
    if code == QuotaError.code:
        return QuotaError(str(details.get("quota", "sessions")), int(details.get("active_sessions", 0)),
                          int(details.get("max_sessions", 0)))
    return _BY_CODE.get(code, SandboxEnvError)(message, **details)
