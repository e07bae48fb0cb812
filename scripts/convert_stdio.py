#!/usr/bin/env python3
"""APPS / CodeContests / LiveCodeBench rows (JSONL, one published row a line) -> task JSONL.

    scripts/convert_stdio.py FORMAT ROWS.jsonl TASKS.jsonl [--language c]

FORMAT: apps, codecontests or livecodebench (docs/tasks.md: where their rows come from, which
columns are read). Each task is validated against our schema before it is written; rows that
are not stdio problems are skipped and counted. Serve the result: sandbox-env serve --tasks TASKS.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sandbox_env.grading.datasets import FORMATS, Converter
from sandbox_env.grading.tasks import parse_task


def rows(path: Path):  # type: ignore[no-untyped-def]
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("rows", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--language", default=None, help="the solutions' language (default: python)")
    args = parser.parse_args()
    converter = Converter(args.format, language=args.language)
    written = 0
    with args.out.open("w", encoding="utf-8") as out:
        for task in converter.convert(rows(args.rows)):
            parse_task(task, where=task["id"])
            out.write(json.dumps(task) + "\n")
            written += 1
    print(f"{written} tasks written to {args.out}", file=sys.stderr)
    for reason, count in converter.skipped.most_common():
        print(f"skipped {count}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
