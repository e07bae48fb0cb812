"""`EpisodeManager` on the fake backend: session limits, quotas, policies, idle timeout, one-shot
grading with its stash of kernels, and backend-wide setup and teardown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from unit_helpers import fake_settings

from sandbox_env.errors import (
    CapacityError,
    ConfigError,
    DrainingError,
    KernelDiedError,
    PolicyNotFoundError,
    QuotaError,
    TaskError,
    TaskNotFoundError,
)
from sandbox_env.grading.tasks import parse_task
from sandbox_env.kernels.fake import FakeKernel
from sandbox_env.manager import EpisodeManager
from sandbox_env.models import CodeAction

SQUARE = parse_task({"id": "square", "timeout_s": 1, "tests": {
    "kind": "function", "entry_point": "square", "check": "def check(candidate):\n    assert candidate(3) == 9\n"}})
GOOD = "def square(x):\n    return x * x\n"

Factory = Callable[..., Any]


@pytest_asyncio.fixture
async def managers() -> AsyncIterator[Factory]:
    """Started managers on the fake backend, shut down after the test."""
    started: list[EpisodeManager] = []

    async def make(**settings: Any) -> EpisodeManager:
        manager = EpisodeManager(fake_settings(**settings))
        started.append(manager)
        await manager.start()
        return manager

    yield make
    for manager in started:
        await manager.shutdown()


async def test_sessions_up_to_the_limit(managers: Factory) -> None:
    manager = await managers(max_sessions=2)
    first, second = await manager.open_episode(), await manager.open_episode()
    assert (manager.active, manager.ready()) == (2, False)
    with pytest.raises(CapacityError):
        await manager.open_episode()
    await manager.close_episode(first)
    assert first.closed and manager.ready()
    assert manager.owned(None) == [second]
    async with manager.stateless() as throwaway:
        assert manager.active == 2
    assert throwaway.closed and manager.active == 1


async def test_closed_episodes_hand_their_kernels_to_the_pool(managers: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that says it recycles gets its kernels back through the pool; the fake's recycle
    then refuses (unsupported): closed by the pool, and counted."""
    monkeypatch.setattr(FakeKernel, "recycles", True)
    manager = await managers()
    episode = await manager.open_episode("alice")
    await episode.reset()
    kernel = episode._kernel
    await manager.close_episode(episode)
    pool = manager._pools["default"]
    while pool.returning:
        await asyncio.sleep(0.01)
    assert kernel is not None and not kernel.is_alive()
    assert manager.recycle_refusals() == {"default": {"unsupported": 1}}
    assert manager.pool_stats()["default"]["fresh"] == 1


async def test_tenant_quota(managers: Factory) -> None:
    manager = await managers(max_sessions=4, tenant_max_sessions=1)
    mine = await manager.open_episode("alice")
    with pytest.raises(QuotaError):
        await manager.open_episode("alice")
    await manager.open_episode("bob")
    assert manager.owned("alice") == [mine] and len(manager.owned(None)) == 2


async def test_a_draining_manager_refuses_new_work(managers: Factory) -> None:
    manager = await managers()
    episode = await manager.open_episode()
    await episode.reset()
    await manager.shutdown()
    assert episode.closed and not manager.ready()
    with pytest.raises(DrainingError):
        await manager.open_episode()
    with pytest.raises(DrainingError):
        await manager.grade(SQUARE, GOOD)


async def test_policies_by_name_only(managers: Factory) -> None:
    manager = await managers(allowed_policies=["default", "strict"])
    assert manager.policy(None).name == "default" and manager.policy("strict").name == "strict"
    for bad in ("trusted-eval", "../etc/x", "mine.toml"):
        with pytest.raises(PolicyNotFoundError):
            manager.policy(bad)
    episode = await manager.open_episode()
    first = await episode.reset(policy="strict")
    assert first.metadata["policy"] == "strict" and set(manager.pool_stats()) == {"default", "strict"}
    only_default = await managers()
    with pytest.raises(PolicyNotFoundError):  # an operator's extra policy opens to no one by default
        only_default.policy("strict")


async def test_idle_sessions_are_closed(managers: Factory) -> None:
    manager = await managers(session_timeout_s=0.2)
    idle, busy = await manager.open_episode(), await manager.open_episode()
    await idle.reset()
    await busy.reset()
    stepping = asyncio.create_task(busy.step(CodeAction(code="import time\nfor _ in range(24): time.sleep(0.05)"),
                                             timeout_s=5))
    for _ in range(60):  # the reaper looks every max(timeout / 4, 1 s)
        await asyncio.sleep(0.05)
        if idle.closed:
            break
    assert idle.closed and manager.owned(None) == [busy]
    assert not busy.closed  # a step in flight is activity
    await stepping


async def test_one_shot_grading_reuses_a_stashed_kernel(managers: Factory) -> None:
    manager = await managers(grader_stash=1)
    first = await manager.grade(SQUARE, GOOD)
    assert (first.status, first.reward) == ("graded", 1.0)
    stashed = manager._graders["default", ""]
    assert len(stashed) == 1 and manager.grading == 0
    kernel = stashed[0]
    again = await manager.grade(SQUARE, "def square(x):\n    return x\n", reward="fraction")
    assert again.reward == 0.0 and manager._graders["default", ""] == [kernel]  # the same kernel, graded again
    kernel.crash()  # died in the stash: closed, and a fresh one grades
    assert (await manager.grade(SQUARE, GOOD)).reward == 1.0
    assert manager._graders["default", ""][0] is not kernel and not kernel.is_alive()


async def test_a_stashed_kernel_grades_only_for_its_owner(managers: Factory) -> None:
    manager = await managers(grader_stash=1)
    assert (await manager.grade(SQUARE, GOOD, owner="alice")).reward == 1.0
    kernel = manager._graders["default", "alice"][0]
    assert (await manager.grade(SQUARE, GOOD, owner="bob")).reward == 1.0
    assert manager._graders["default", "alice"] == [kernel] and manager._graders["default", "bob"][0] is not kernel


async def test_no_stash_and_infrastructure_failures(managers: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = await managers(grader_stash=0)
    assert (await manager.grade(SQUARE, GOOD)).reward == 1.0
    assert manager._graders["default", ""] == []

    async def broken(self: FakeKernel, source: str, **_: Any) -> Any:
        raise KernelDiedError("the sandbox fell over")

    monkeypatch.setattr(FakeKernel, "run_program", broken)
    failed = await manager.grade(SQUARE, GOOD)
    assert (failed.status, failed.reward, failed.retryable) == ("infra_error", None, True)
    assert manager._graders["default", ""] == []


async def test_grading_limits(managers: Factory) -> None:
    manager = await managers(max_sessions=2, tenant_max_gradings=1)
    with pytest.raises(TaskError):
        await manager.grade(SQUARE, GOOD, reward="no-such-reward")
    slow = "import time\ntime.sleep(0.4)\n" + GOOD
    first = asyncio.create_task(manager.grade(SQUARE, slow, owner="alice"))
    while manager.grading == 0:
        await asyncio.sleep(0.01)
    with pytest.raises(QuotaError):
        await manager.grade(SQUARE, GOOD, owner="alice")
    await manager.open_episode()
    with pytest.raises(CapacityError):  # one episode and one grading fill two slots
        await manager.grade(SQUARE, GOOD, owner="bob")
    assert (await first).reward == 1.0 and manager.gradings == {}


async def test_task_resolution(managers: Factory, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(SQUARE.model_dump(mode="json")) + "\n")
    manager = await managers(tasks=str(tasks), max_grading_s=100)
    assert manager.resolve_task("square").id == "square"
    with pytest.raises(TaskNotFoundError):
        manager.resolve_task("missing")
    with pytest.raises(TaskError):
        manager.resolve_task()
    with pytest.raises(TaskError):
        manager.resolve_task(task={"id": "bad", "tests": {"kind": "nonsense"}})
    inline = {"id": "slow", "timeout_s": 60, "tests": {"kind": "asserts", "asserts": ["assert 1"] * 4}}
    clamped = manager.resolve_task(task=inline)
    assert clamped.timeout_s == manager.default_policy.timeout_s  # at most the step limit
    many = manager.resolve_task(task={**inline, "tests": {"kind": "asserts", "asserts": ["assert 1"] * 100}})
    assert many.timeout_s == pytest.approx((100 - 10) / 100)  # all tests within max_grading_s
    cases = [{"input": "", "output": ""}] * 100
    compiled = manager.resolve_task(task={**inline, "tests": {"kind": "stdio", "language": "c", "cases": cases,
                                                              "compile_timeout_s": 60}})
    step = manager.default_policy.timeout_s  # the compile step: at most a step, and within max_grading_s too
    assert compiled.tests.compile_timeout_s == step
    assert compiled.timeout_s == pytest.approx((100 - 10 - step) / 100)
    closed = await managers(allow_inline_tasks=False)
    with pytest.raises(TaskError, match="turned off"):
        closed.resolve_task(task=inline)


async def test_backend_setup_and_teardown_run_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def setup(cls: type[FakeKernel]) -> dict[str, Any]:
        calls.append("setup")
        return {"probe": "ok"}

    async def teardown(cls: type[FakeKernel]) -> None:
        calls.append("teardown")

    monkeypatch.setattr(FakeKernel, "setup_backend", classmethod(setup))
    monkeypatch.setattr(FakeKernel, "teardown_backend", classmethod(teardown))
    first, second = EpisodeManager(fake_settings()), EpisodeManager(fake_settings())
    await first.start()
    await second.start()
    assert calls == ["setup"] and first.runtime_report == {"probe": "ok"}
    await first.shutdown()
    assert calls == ["setup"]  # the other manager's sandboxes are still in use
    await second.shutdown()
    await second.shutdown()  # idempotent: counted once
    assert calls == ["setup", "teardown"]


def test_settings_are_checked_at_construction() -> None:
    with pytest.raises(ConfigError):
        EpisodeManager(fake_settings(reward="no-such-reward"))
    manager = EpisodeManager(fake_settings(max_sessions=4, history_bytes=1 << 20, history_total_bytes=1 << 20))
    assert manager.history_budget == (1 << 20) // 4 and manager.capacity == 4
