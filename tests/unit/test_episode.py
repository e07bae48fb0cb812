"""`Episode` on fake kernels: reset, step, state, history, submissions, and its error paths."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from unit_helpers import KernelSource

from sandbox_env.episode import Episode, summary
from sandbox_env.errors import (
    EpisodeClosedError,
    EpisodeError,
    InvalidRequestError,
    KernelDiedError,
    PolicyNotFoundError,
)
from sandbox_env.grading.tasks import Task, parse_task
from sandbox_env.kernels.fake import FakeKernel
from sandbox_env.models import CodeAction, ExecStatus, Grading

SQUARE = parse_task({"id": "square", "prompt": "Write square(x).", "timeout_s": 1, "tests": {
    "kind": "function", "entry_point": "square",
    "check": "def check(candidate):\n    assert candidate(3) == 9\n"}})


@pytest_asyncio.fixture
async def kernels() -> AsyncIterator[KernelSource]:
    source = KernelSource()
    yield source
    for kernel in source.handed:
        await kernel.close()


def tasks(task_id: str | None, task: Any, policy: str | None) -> Task:
    return SQUARE if task_id == "square" else parse_task(task)


def episode(kernels: KernelSource, **options: Any) -> Episode:
    return Episode(kernels, backend="fake", tasks=tasks, **options)


async def test_reset_step_state(kernels: KernelSource) -> None:
    ep = episode(kernels)
    first = await ep.reset(seed=7, episode_id="e-1", label="kept")
    assert first.stdout == "" and first.metadata == {"episode_id": "e-1", "policy": "unit", "backend": "fake"}
    assert (ep.id, ep.state.seed, ep.state.label) == ("e-1", 7, "kept")  # type: ignore[attr-defined]
    await ep.step(CodeAction(code="x = 41"))
    obs = await ep.step(CodeAction(code="print(x + 1)"))
    assert (obs.stdout, obs.status, obs.reward, obs.done) == ("42\n", ExecStatus.OK, 0.0, False)
    failed = await ep.step(CodeAction(code="1 / 0"))
    assert failed.exception is not None and failed.exception.type == "ZeroDivisionError"
    state = ep.state
    assert (state.step_count, state.last_exit_code, state.backend) == (3, 1, "fake")
    assert [h["step"] for h in ep.history] == [1, 2, 3]
    assert ep.submission("") == "x = 41\nprint(x + 1)"  # the steps that ran ok, in order


async def test_a_reset_takes_a_fresh_kernel_and_closes_the_old_one(kernels: KernelSource) -> None:
    ep = episode(kernels)
    await ep.step(CodeAction(code="x = 1"))  # a step before any reset resets implicitly
    assert ep.id is not None and len(kernels.handed) == 1
    await ep.reset()
    obs = await ep.step(CodeAction(code="print(x)"))
    assert obs.exception is not None and obs.exception.type == "NameError"
    await asyncio.sleep(0)  # the old kernel closes off the reset's path
    await ep.close()
    assert [k.is_alive() for k in kernels.handed] == [False, False]
    await ep.close()  # idempotent


def taking(released: list[Any]) -> Any:
    """A sink like the pool's: it takes kernels whose backend recycles, and only those."""
    def sink(kernel: Any) -> bool:
        if kernel.recycles:
            released.append(kernel)
        return bool(kernel.recycles)
    return sink


async def test_kernels_done_with_go_back_through_release_without_waiting(kernels: KernelSource,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeKernel, "recycles", True)  # as a backend that can recycle (Docker)
    released: list[Any] = []
    ep = episode(kernels, release=taking(released))
    await ep.reset()
    await ep.reset()  # the first kernel goes back, still alive: its pool recycles or closes it
    assert released == kernels.handed[:1] and released[0].is_alive()
    await ep.close()
    assert released == kernels.handed and all(k.is_alive() for k in released)


async def test_a_kernel_that_failed_is_closed_not_released(kernels: KernelSource) -> None:
    released: list[Any] = []
    ep = episode(kernels, release=taking(released))
    await ep.reset()
    kernels.handed[0].crash()
    with pytest.raises(KernelDiedError):
        await ep.step(CodeAction(code="print(1)"))
    await ep.close()
    assert released == [] and not kernels.handed[0].is_alive()


async def test_a_kernel_that_cannot_recycle_is_closed_by_the_episode(kernels: KernelSource) -> None:
    released: list[Any] = []
    ep = episode(kernels, release=taking(released))
    await ep.reset()
    await ep.close()  # waits for the kernel, as before recycling existed
    assert released == [] and not kernels.handed[0].is_alive()


async def test_a_failed_reset_keeps_the_episode(kernels: KernelSource) -> None:
    ep = episode(kernels)
    await ep.reset()
    await ep.step(CodeAction(code="x = 5"))
    kernels.fail = PolicyNotFoundError("no policy 'nope'")
    with pytest.raises(PolicyNotFoundError):
        await ep.reset(policy="nope")
    assert (await ep.step(CodeAction(code="print(x)"))).stdout == "5\n"


async def test_reset_options_may_not_set_reserved_fields(kernels: KernelSource) -> None:
    ep = episode(kernels)
    with pytest.raises(InvalidRequestError):
        await ep.reset(step_count=5)
    with pytest.raises(InvalidRequestError):
        await ep.reset(grading={"reward": 1.0})
    plain = await ep.reset(task="a name")  # not a task: kept as an option
    assert ep.task is None and ep.state.task == "a name" and plain.stdout == ""  # type: ignore[attr-defined]


async def test_a_step_timeout_can_only_shorten_the_policy(kernels: KernelSource) -> None:
    ep = episode(kernels)
    await ep.reset()
    quick = await ep.step(CodeAction(code="while True: pass"), timeout_s=0.1)
    assert quick.status is ExecStatus.TIMEOUT and quick.execution.wall_time_s < 0.4  # type: ignore[union-attr]
    capped = await ep.step(CodeAction(code="while True: pass"), timeout_s=60)  # the policy's 0.5 s
    assert capped.status is ExecStatus.TIMEOUT and capped.execution.wall_time_s < 0.5 + 1  # type: ignore[union-attr]


async def test_a_lost_kernel_needs_a_reset(kernels: KernelSource) -> None:
    ep = episode(kernels)
    await ep.reset()
    kernels.handed[0].crash()
    with pytest.raises(KernelDiedError):
        await ep.step(CodeAction(code="print(1)"))
    with pytest.raises(KernelDiedError, match="call reset"):
        await ep.step(CodeAction(code="print(1)"))
    assert not kernels.handed[0].is_alive()
    await ep.reset()
    assert (await ep.step(CodeAction(code="print(1)"))).stdout == "1\n"


async def test_a_closed_episode_refuses_everything(kernels: KernelSource) -> None:
    ep = episode(kernels)
    await ep.close()
    assert ep.closed
    with pytest.raises(EpisodeClosedError):
        await ep.reset()
    with pytest.raises(EpisodeClosedError):
        await ep.step(CodeAction(code="1"))


async def test_closed_while_the_kernel_was_starting(kernels: KernelSource) -> None:
    ep = episode(kernels)
    gate = asyncio.Event()

    async def slow(policy: str | None) -> Any:
        await gate.wait()
        return await kernels(policy)

    ep._acquire = slow
    resetting = asyncio.create_task(ep.reset())
    await asyncio.sleep(0)
    await ep.close()
    gate.set()
    with pytest.raises(EpisodeClosedError):
        await resetting
    assert not kernels.handed[0].is_alive()  # nobody else would ever close it


async def test_submit_grades_once(kernels: KernelSource) -> None:
    ep = episode(kernels)
    first = await ep.reset(task_id="square")
    assert first.stdout == "Write square(x)." and first.metadata["task"]["id"] == "square"
    await ep.step(CodeAction(code="def square(x):\n    return x * x"))
    await ep.step(CodeAction(code="raise ValueError"))  # not ok: not part of the submission
    graded = await ep.step(CodeAction(code="", submit=True))
    assert (graded.reward, graded.done, graded.exit_code) == (1.0, True, 0)
    assert graded.grading is not None and graded.grading.passed == 1
    assert ep.state.grading["reward"] == 1.0  # type: ignore[attr-defined]
    with pytest.raises(EpisodeClosedError, match="done"):
        await ep.step(CodeAction(code="print(1)"))


async def test_an_inline_task_and_a_failing_submission(kernels: KernelSource) -> None:
    ep = episode(kernels)
    await ep.reset(task={"id": "inline", "tests": {"kind": "asserts", "asserts": ["assert f() == 1"]}})
    graded = await ep.step(CodeAction(code="def f():\n    return 2", submit=True))
    assert (graded.reward, graded.done, graded.exit_code) == (0.0, True, 1)
    assert "0/1 tests passed" in graded.stdout and "assert 0: failed" in graded.stdout


async def test_submit_errors(kernels: KernelSource) -> None:
    ep = episode(kernels)
    with pytest.raises(EpisodeError, match="nothing to grade"):
        await ep.step(CodeAction(code="x = 1", submit=True))
    no_source = Episode(kernels, backend="fake")
    with pytest.raises(EpisodeError, match="no task source"):
        await no_source.reset(task_id="square")
    capped = episode(kernels, history_bytes=300)
    await capped.reset(task_id="square")
    await capped.step(CodeAction(code="print('x' * 1000)"))
    with pytest.raises(InvalidRequestError, match="capped"):
        await capped.step(CodeAction(code="", submit=True))
    await no_source.close()
    await capped.close()


async def test_infrastructure_failure_is_no_end(kernels: KernelSource) -> None:
    ep = episode(kernels)
    await ep.reset(task_id="square")
    kernels.handed[0].crash()  # run_program raises KernelDiedError: an infra_error, retryable
    graded = await ep.step(CodeAction(code="def square(x): return x * x", submit=True))
    assert graded.grading is not None and graded.grading.status == "infra_error" and not graded.done
    assert graded.reward is None and "outside the submission" in graded.stdout


async def test_inspect(kernels: KernelSource) -> None:
    ep = episode(kernels)
    assert (await ep.inspect())["kernel"] == {}
    await ep.step(CodeAction(code="answer = 42"))
    seen = await ep.inspect()
    assert {"name": "answer", "type": "int", "repr": "42"} in seen["kernel"]["variables"]
    assert seen["history"][0]["code"] == "answer = 42" and seen["state"]["step_count"] == 1
    await ep.close()


def test_summary_lists_what_did_not_pass() -> None:
    failed = Grading.model_validate({"task_id": "t", "status": "graded", "reward": 0.5, "passed": 1, "total": 2,
                                     "tests": [{"name": "a", "status": "passed"},
                                               {"name": "b", "status": "failed", "message": "boom\nmore"}]})
    assert summary(failed) == "1/2 tests passed, reward 0.5\nb: failed - boom\n"
