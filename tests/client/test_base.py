"""Pure helpers of the client: URL mapping, action coercion, payload and error-frame parsing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sandbox_env.client._base import StepResult, error_from_frame, http_url, to_action, ws_url
from sandbox_env.errors import CapacityError, KernelDiedError, SandboxEnvError
from sandbox_env.models import CodeAction, CodeObservation, ExecStatus, ExecutionResult


@pytest.mark.parametrize(("base", "expected"), [
    ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws"),
    ("https://example.org/prefix/", "wss://example.org/prefix/ws"),
    ("ws://host:1/ws", "ws://host:1/ws"),
    ("localhost:8000", "ws://localhost:8000/ws"),
])
def test_ws_url_maps_http_roots_to_the_ws_endpoint(base: str, expected: str) -> None:
    assert ws_url(base) == expected


def test_http_url_strips_the_ws_endpoint() -> None:
    assert http_url("wss://example.org/p/ws") == "https://example.org/p"


def test_ws_url_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="scheme"):
        ws_url("ftp://example.org")


def test_to_action_accepts_str_dict_and_model_equally() -> None:
    expected = CodeAction(code="print(1)")
    assert to_action("print(1)") == expected
    assert to_action({"code": "print(1)"}) == expected
    assert to_action(expected) is expected
    assert to_action("x", metadata={"task": 3}).metadata == {"task": 3}


def test_to_action_rejects_unknown_fields_and_types() -> None:
    with pytest.raises(ValidationError):
        to_action({"code": "x", "cmd": "y"})
    with pytest.raises(ValidationError):
        to_action({})
    with pytest.raises(TypeError):
        to_action(42)  # type: ignore[arg-type]


def test_step_result_round_trips_the_wire_payload() -> None:
    result = ExecutionResult(stdout="hi\n", exit_code=0, status=ExecStatus.OK, wall_time_s=0.01)
    observation = CodeObservation.from_result(result, reward=0.5)
    parsed = StepResult.from_wire(observation.to_wire())
    assert parsed.reward == 0.5 and parsed.done is False
    assert parsed.observation.stdout == "hi\n"
    assert parsed.observation.status is ExecStatus.OK
    assert parsed.metadata["execution"]["status"] == "ok"


def test_capacity_frame_becomes_capacity_error() -> None:
    err = error_from_frame({"message": "full", "code": "CAPACITY_REACHED",
                            "active_sessions": 2, "max_sessions": 2})
    assert isinstance(err, CapacityError)
    assert (err.active, err.limit) == (2, 2)


def test_our_error_codes_map_to_their_classes() -> None:
    assert isinstance(error_from_frame({"message": "dead", "code": "kernel_died"}), KernelDiedError)


def test_protocol_codes_keep_their_wire_code() -> None:
    err = error_from_frame({"message": "Unknown message type: bogus", "code": "UNKNOWN_TYPE"})
    assert type(err) is SandboxEnvError
    assert err.details["wire_code"] == "UNKNOWN_TYPE"
    assert "bogus" in str(err)
