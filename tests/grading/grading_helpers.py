"""Helpers for the grading tests: task builders and the repository-level live server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from sandbox_env.grading.tasks import Task, parse_task

# The repository-level conftest is not importable by name (every test folder has a conftest).
_spec = importlib.util.spec_from_file_location("_tests_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
assert _spec is not None and _spec.loader is not None
_root = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("_tests_root_conftest", _root)
_spec.loader.exec_module(_root)
run_live_server = _root.run_live_server


def make_task(tests: dict[str, Any], **fields: Any) -> Task:
    return parse_task({"id": fields.pop("id", "t"), "tests": tests, **fields})


SQUARE_CHECK = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"
SQUARE = make_task({"kind": "function", "check": SQUARE_CHECK, "entry_point": "square"}, timeout_s=2)
GOOD_SQUARE = "def square(x):\n    return x * x\n"
