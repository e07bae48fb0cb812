from __future__ import annotations

import pytest
from pydantic import ValidationError

from sandbox_env.errors import CapacityError, KernelDiedError, SandboxEnvError, error_from_dict
from sandbox_env.models import (
    CodeAction,
    CodeObservation,
    ExceptionInfo,
    ExecStatus,
    ExecutionResult,
)


def test_action_accepts_openenv_metadata_and_rejects_extras() -> None:
    assert CodeAction.model_validate({"code": "x", "metadata": {"a": 1}}).metadata == {"a": 1}
    with pytest.raises(ValidationError):
        CodeAction.model_validate({"code": "x", "cmd": "y"})
    with pytest.raises(ValidationError):
        CodeAction.model_validate({})


def test_wire_observation_has_exactly_the_coding_env_keys() -> None:
    result = ExecutionResult(stdout="1\n", exit_code=1, status=ExecStatus.ERROR,
                             exception=ExceptionInfo(type="ValueError", message="bad"), wall_time_s=0.5)
    wire = CodeObservation.from_result(result, reward=0.0).to_wire()
    assert set(wire) == {"observation", "reward", "done", "metadata"}
    assert set(wire["observation"]) == {"stdout", "stderr", "exit_code", "metadata"}
    assert wire["metadata"] == wire["observation"]["metadata"]
    # stdout travels once, not again inside the metadata
    assert "stdout" not in wire["observation"]["metadata"]["execution"]


def test_typed_view_round_trips_through_the_wire() -> None:
    result = ExecutionResult(stdout="out", stderr="err", exit_code=1, status=ExecStatus.TIMEOUT,
                             stdout_truncated=True, cpu_time_s=0.25)
    obs = CodeObservation.from_wire(CodeObservation.from_result(result).to_wire())
    assert obs.execution == result
    assert obs.status is ExecStatus.TIMEOUT
    assert obs.execution is not None and obs.execution.truncated


def test_reset_observation_has_no_execution() -> None:
    obs = CodeObservation(reward=0.0)
    assert obs.execution is None and obs.status is None
    assert "metadata" not in obs.to_wire()


def test_errors_round_trip_by_code() -> None:
    err = error_from_dict(KernelDiedError("gone", episode="e1").to_dict())
    assert isinstance(err, KernelDiedError) and err.details == {"episode": "e1"} and err.retryable
    cap = error_from_dict({"message": "full", "code": "CAPACITY_REACHED", "active_sessions": 2,
                           "max_sessions": 2})
    assert isinstance(cap, CapacityError) and cap.limit == 2
    assert type(error_from_dict({"code": "???", "message": "m"})) is SandboxEnvError
