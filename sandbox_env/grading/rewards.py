"""Reward policies: test outcomes -> a scalar. Named, parameterised, pluggable.

A policy is written `name[:key=value,...]`, e.g. `binary`, `fraction:timeout_penalty=0.1` or
`weighted:error_penalty=0.5`. Penalties subtract `penalty * (share of tests with that outcome)`,
so a reward may go below 0. Infrastructure failures never reach a policy: their reward is None.
Imports models and errors only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from sandbox_env.errors import ConfigError
from sandbox_env.models import CodeObservation, TestResult, TestStatus

DEFAULT_REWARD = "binary"
_ERRORS = (TestStatus.ERROR, TestStatus.OOM, TestStatus.OUTPUT_LIMIT, TestStatus.COMPILE_ERROR)


@runtime_checkable
class RewardPolicy(Protocol):
    """Maps per-test results (and optional per-test weights) to a reward."""

    def __call__(self, tests: Sequence[TestResult], weights: Sequence[float] | None = None) -> float: ...


@dataclass(frozen=True)
class TestReward:
    """One of the built-in policies; also usable as an OpenEnv Rubric (`forward(action, obs)`)."""

    __test__ = False

    kind: str = "binary"  # binary | fraction | weighted
    timeout_penalty: float = 0.0
    error_penalty: float = 0.0

    def __call__(self, tests: Sequence[TestResult], weights: Sequence[float] | None = None) -> float:
        total = len(tests)
        if total == 0:
            return 0.0  # nothing ran is never a pass
        passed = [t.status is TestStatus.PASSED for t in tests]
        if self.kind == "binary":
            base = 1.0 if all(passed) else 0.0
        elif self.kind == "weighted" and weights is not None and len(weights) == total and sum(weights) > 0:
            base = sum(w for w, ok in zip(weights, passed) if ok) / sum(weights)
        else:  # fraction, or weighted without usable weights
            base = sum(passed) / total
        timeouts = sum(t.status is TestStatus.TIMEOUT for t in tests) / total
        errors = sum(t.status in _ERRORS for t in tests) / total
        return base - self.timeout_penalty * timeouts - self.error_penalty * errors

    def forward(self, action: Any, observation: CodeObservation) -> float:
        """Rubric-style: the reward of a submit observation (0 when it carries no grading)."""
        grading = observation.grading
        if grading is None or grading.status != "graded":
            return 0.0
        return self(grading.tests)


_FACTORIES: dict[str, Callable[..., RewardPolicy]] = {
    "binary": lambda **kw: TestReward("binary", **kw),
    "fraction": lambda **kw: TestReward("fraction", **kw),
    "weighted": lambda **kw: TestReward("weighted", **kw),
}


def register_reward(name: str, factory: Callable[..., RewardPolicy]) -> None:
    """Add a policy: `factory(**params)` gets the `key=value` pairs of the spec as floats."""
    _FACTORIES[name] = factory


def reward_policy(spec: str | None) -> RewardPolicy:
    """Build a policy from `name[:key=value,...]`; unknown names or parameters raise ConfigError."""
    name, _, params = (spec or DEFAULT_REWARD).partition(":")
    factory = _FACTORIES.get(name.strip())
    if factory is None:
        raise ConfigError(f"reward: unknown policy {name!r}; known: {', '.join(sorted(_FACTORIES))}")
    kwargs: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, sep, value = item.partition("=")
        try:
            kwargs[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"reward: bad parameter {item[:100]!r} (expected key=number)")
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"reward: {(spec or '')[:100]!r}: {exc}") from exc
