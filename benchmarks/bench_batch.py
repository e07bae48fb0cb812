"""Issue-12 figure: 64 submissions x 10 stdio tests in ONE `POST /grade/batch` against the same 640
(code, stdin, expected stdout) runs sent as per-test SandboxFusion `POST /run_code` calls, the way
verl sends them, at the same client concurrency.

    python benchmarks/bench_batch.py [--concurrency 8] [--backend jupyter]

One `sandbox-env serve`; a warm-up of each path first; every reply is checked (all 640 tests pass
either way). Reports both throughputs (tests per second) and their ratio (target: batch >= 3 x).
One run, no assertion on time. Writes JSON to benchmarks/results/batch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _util import ServerProcess, write_results

TARGET_RATIO = 3.0
SUBMISSIONS, TESTS = 64, 10
CASES = [(f"{i} {3 * i + 1}\n", f"{4 * i + 1}\n") for i in range(TESTS)]
TASK = {"id": "sum", "prompt": "", "tests": {"kind": "stdio", "cases": [{"input": i, "output": o} for i, o in CASES]}}


def submission(n: int) -> str:
    return f"# submission {n}\na, b = map(int, input().split())\nprint(a + b)\n"  # distinct: no dedupe


async def per_test(http: httpx.AsyncClient, concurrency: int, count: int) -> float:
    """`count` submissions' tests as /run_code calls, `concurrency` in flight; seconds taken."""
    jobs = [(submission(n), stdin, out) for n in range(count) for stdin, out in CASES]
    limit = asyncio.Semaphore(concurrency)

    async def one(code: str, stdin: str, expected: str) -> None:
        async with limit:
            reply = await http.post("/run_code", json={"code": code, "language": "python", "stdin": stdin,
                                                       "run_timeout": 10})
        body = reply.json()
        if reply.status_code != 200 or body["status"] != "Success" or body["run_result"]["stdout"] != expected:
            raise RuntimeError(f"/run_code: {reply.status_code} {body}")

    started = time.perf_counter()
    await asyncio.gather(*(one(*job) for job in jobs))
    return time.perf_counter() - started


async def batch(http: httpx.AsyncClient, concurrency: int, count: int) -> tuple[float, dict[str, Any]]:
    body = {"items": [{"task": TASK, "submission": submission(n)} for n in range(count)], "parallel": concurrency}
    started = time.perf_counter()
    lines = []
    async with http.stream("POST", "/grade/batch", json=body) as reply:
        async for line in reply.aiter_lines():
            if line.strip():
                lines.append(json.loads(line))
    elapsed = time.perf_counter() - started
    results = [line for line in lines if line["type"] == "result"]
    if len(results) != count or any(r["grading"]["passed"] != TESTS for r in results):
        raise RuntimeError(f"/grade/batch: {lines[:3]} ... {lines[-1]}")
    return elapsed, lines[-1]["summary"]


async def measure(concurrency: int, backend: str) -> dict[str, Any]:
    env = {"SANDBOX_ENV_BACKEND": backend, "PYTHONPATH": str(ROOT), "SANDBOX_ENV_MAX_SESSIONS": str(max(8, concurrency)),
           "SANDBOX_ENV_POOL_SIZE": str(concurrency), "SANDBOX_ENV_GRADER_STASH": str(concurrency)}
    with ServerProcess(env=env) as server:
        limits = httpx.Limits(max_connections=concurrency + 2)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=600, limits=limits) as http:
            await per_test(http, concurrency, concurrency)  # warm-up: kernels started, stashed
            await batch(http, concurrency, concurrency)
            per_test_s = await per_test(http, concurrency, SUBMISSIONS)
            batch_s, summary = await batch(http, concurrency, SUBMISSIONS)
    tests = SUBMISSIONS * TESTS
    ratio = per_test_s / batch_s
    return {"backend": backend, "concurrency": concurrency, "cpus": os.cpu_count(), "submissions": SUBMISSIONS,
            "tests_per_submission": TESTS, "per_test_run_code_s": round(per_test_s, 3), "batch_s": round(batch_s, 3),
            "per_test_tests_per_s": round(tests / per_test_s, 1), "batch_tests_per_s": round(tests / batch_s, 1),
            "throughput_ratio": round(ratio, 2), "target_ratio": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
            "batch_summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backend", default="jupyter")
    args = parser.parse_args()
    result = asyncio.run(measure(args.concurrency, args.backend))
    path = write_results("batch" if args.backend == "jupyter" else f"batch_{args.backend}", result)
    print(result)
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
