from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sandbox_env.errors import ConfigError, PolicyNotFoundError
from sandbox_env.policy import Policy, available_policies, load_policy


def test_shipped_policies_load_and_differ() -> None:
    names = available_policies()
    assert {"default", "strict", "trusted-eval"} <= set(names)
    default, strict = load_policy("default"), load_policy("strict")
    assert default.name == "default" and strict.name == "strict"
    assert strict.memory_mb < default.memory_mb
    assert strict.timeout_s < default.timeout_s
    assert default.network is False and strict.network is False


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(PolicyNotFoundError) as info:
        load_policy("no-such-policy")
    assert "default" in str(info.value)


def test_bad_field_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('memory_mb = -5\ntimeout_s = "soon"\n')
    with pytest.raises(ConfigError) as info:
        load_policy(str(bad))
    message = str(info.value)
    assert "memory_mb" in message and "timeout_s" in message and "bad.toml" in message


def test_unknown_field_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "typo.toml"
    bad.write_text("memroy_mb = 100\n")
    with pytest.raises(ConfigError, match="memroy_mb"):
        load_policy(str(bad))


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("timeout_s = = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_policy(str(bad))


def test_policy_is_immutable() -> None:
    policy = Policy(name="x")
    with pytest.raises(ValidationError):
        policy.memory_mb = 1  # type: ignore[misc]
