"""Published stdio benchmarks (APPS, CodeContests, LiveCodeBench) as our task records.

Their data is not in any installable package (each is a Hugging Face dataset, fetched at run
time, which an offline machine cannot do), so these functions convert rows the user obtained:
one row, as its dataset publishes it (the columns of its `datasets` rows, or one JSON line of
its files), to a task dict (docs/tasks.md), valid JSONL for `sandbox-env serve --tasks`.
`scripts/convert_stdio.py` runs them over a file. A row that cannot become a stdio task
(function-call tests, no tests) gives None with the reason in `skipped`.

LiveCodeBench ships most private tests as base64(zlib(pickle(json))). A pickle can run code
while it loads, so these are never unpickled here: only public tests, or private tests given as
plain JSON, are converted. Standard library only.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

FORMATS = ("apps", "codecontests", "livecodebench")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_./:+-]+")


def task_id(prefix: str, raw: Any) -> str:
    """An id our schema accepts: other characters (spaces, brackets) become '-'."""
    return f"{prefix}/{_UNSAFE_ID.sub('-', str(raw)).strip('-')}"[:200]


def _lines(value: Any) -> str:
    """APPS keeps some expected outputs as lists of lines; stdin/stdout text either way."""
    if isinstance(value, list):
        return "\n".join(str(v) for v in value) + "\n"
    return str(value)


def _cases(inputs: list[Any], outputs: list[Any], prefix: str) -> list[dict[str, str]]:
    return [{"input": _lines(i), "output": _lines(o), "name": f"{prefix} {n}"}
            for n, (i, o) in enumerate(zip(inputs, outputs, strict=False))]


def _task(tid: str, prompt: str, cases: list[dict[str, str]], public: list[dict[str, str]],
          language: str | None, metadata: dict[str, Any]) -> dict[str, Any]:
    tests: dict[str, Any] = {"kind": "stdio", "cases": cases, "checker": "whitespace"}
    if language is not None:
        tests["language"] = language
    task: dict[str, Any] = {"id": tid, "prompt": prompt, "tests": tests, "metadata": metadata}
    if public:
        task["public_tests"] = [{"input": c["input"], "output": c["output"]} for c in public]
    return task


def _json_field(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) and value.strip() else value


class Converter:
    """Rows of one format to tasks; counts what it skipped and why."""

    def __init__(self, fmt: str, *, language: str | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        self.fmt = fmt
        self.language = language
        self.skipped: Counter[str] = Counter()

    def convert(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            task = getattr(self, f"_{self.fmt}")(row)
            if task is not None:
                yield task

    def _skip(self, reason: str) -> dict[str, Any] | None:
        """Count a row that gives no task; None, the row's result."""
        self.skipped[reason] += 1
        return None

    def _apps(self, row: dict[str, Any]) -> dict[str, Any] | None:
        io = _json_field(row.get("input_output")) or {}
        if io.get("fn_name"):
            return self._skip("apps: function-call tests (fn_name), not stdio")
        cases = _cases(io.get("inputs") or [], io.get("outputs") or [], "case")
        if not cases:
            return self._skip("apps: no tests")
        meta = {"source": "apps", "difficulty": row.get("difficulty"), "url": row.get("url")}
        return _task(task_id("apps", row.get("problem_id")), str(row.get("question", "")), cases, [],
                     self.language, meta)

    def _codecontests(self, row: dict[str, Any]) -> dict[str, Any] | None:
        def tests(column: str) -> list[dict[str, str]]:
            value = row.get(column) or {}
            return _cases(value.get("input") or [], value.get("output") or [], column)

        public = tests("public_tests")
        cases = tests("private_tests") + tests("generated_tests") or public
        if not cases:
            return self._skip("codecontests: no tests")
        meta = {"source": "codecontests", "difficulty": row.get("difficulty"), "cf_rating": row.get("cf_rating")}
        return _task(task_id("codecontests", row.get("name")), str(row.get("description", "")), cases,
                     public, self.language, meta)

    def _livecodebench(self, row: dict[str, Any]) -> dict[str, Any] | None:
        public = self._lcb_cases(row.get("public_test_cases"), "public")
        private = self._lcb_cases(row.get("private_test_cases"), "private")
        if public is None or private is None:
            return self._skip("livecodebench: functional (call-based) tests, not stdio")
        cases = private + public  # the public ones are tests too; LiveCodeBench grades with both
        if not cases:
            return self._skip("livecodebench: no tests")
        meta = {"source": "livecodebench", "platform": row.get("platform"),
                "difficulty": row.get("difficulty"), "contest_date": str(row.get("contest_date", ""))}
        return _task(task_id("livecodebench", row.get("question_id")), str(row.get("question_content", "")),
                     cases, public, self.language, meta)

    def _lcb_cases(self, value: Any, prefix: str) -> list[dict[str, str]] | None:
        """Cases of one column; [] when absent or pickled (never loaded), None when functional."""
        if not value:
            return []
        try:
            items = _json_field(value)
        except ValueError:
            self._skip("livecodebench: private tests pickled (not loaded; see docs/tasks.md)")
            return []
        if any(item.get("testtype") == "functional" for item in items):
            return None
        return _cases([i["input"] for i in items], [i["output"] for i in items], prefix)
