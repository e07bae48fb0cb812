"""Issue-12 figures for languages (part 3), each a ratio of two medians measured in one run:

1. C hello world through SandboxFusion's `POST /run_code` (compile stage + run stage) against
   `gcc` plus the run done by hand in a container of the same image (sandbox-env/c, the same
   hardening: read-only root, /workspace exec tmpfs, uid 10001, no network, the policy's memory
   and CPU), timed inside that container so no `docker exec` is counted. Target <= 1.2.
2. A 100-case stdio task in C through `POST /grade` against the same task in Python. Target <= 1.5.

    python benchmarks/bench_languages.py [--rounds 30] [--warmup 3] [--backend docker]

One `sandbox-env serve`; requests one at a time over a keep-alive connection; every reply is
checked. No assertion on time. Writes JSON to benchmarks/results/languages.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import httpx
from _util import ServerProcess, median_ms, write_results

from sandbox_env.languages import get

HELLO = '#include <stdio.h>\nint main(void){puts("hello");return 0;}\n'
C_SUM = '#include <stdio.h>\nint main(void){long a,b;scanf("%ld %ld",&a,&b);printf("%ld\\n",a+b);return 0;}\n'
PY_SUM = "a, b = map(int, input().split())\nprint(a + b)\n"
CASES = [{"input": f"{i} {i * 7}\n", "output": f"{i * 8}\n"} for i in range(100)]
# Inside the container: `rounds` times gcc then the program, each timed from this process.
BY_HAND = """
import subprocess, sys, time, json
open('/workspace/h.c', 'w').write(sys.argv[2])
times = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    subprocess.run(['gcc', '-O2', '-std=gnu17', '-pipe', '-o', '/workspace/h', '/workspace/h.c', '-lm'], check=True)
    assert subprocess.run(['/workspace/h'], capture_output=True).stdout == b'hello\\n'
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def by_hand(rounds: int, warmup: int) -> list[float]:
    argv = ["docker", "run", "--rm", "--read-only", "--network", "none", "--user", "10001:10001",
            "--memory", "512m", "--cpus", "1", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--tmpfs", "/tmp:rw,nosuid,nodev,noexec,size=64m",
            "--tmpfs", "/workspace:rw,nosuid,nodev,exec,size=256m,uid=10001,gid=10001,mode=0700",
            get("c").image(), "python3", "-c", BY_HAND, str(rounds + warmup), HELLO]
    times: list[float] = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    return times[warmup:]


def timed_post(http: httpx.Client, path: str, body: dict[str, Any], ok: Any) -> float:
    started = time.perf_counter()
    reply = http.post(path, json=body)
    elapsed = time.perf_counter() - started
    if reply.status_code != 200 or not ok(reply.json()):
        raise RuntimeError(f"{path}: {reply.status_code} {reply.text[:500]}")
    return elapsed


def grade_body(language: str, submission: str) -> dict[str, Any]:
    return {"task": {"id": f"sum-{language}", "prompt": "sum", "tests": {
        "kind": "stdio", "language": language, "cases": CASES}}, "submission": submission}


def measure(rounds: int, warmup: int, backend: str) -> dict[str, Any]:
    env = {"SANDBOX_ENV_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    hello = {"language": "c", "code": HELLO}
    hello_ok = lambda b: b["status"] == "Success" and b["run_result"]["stdout"] == "hello\n"  # noqa: E731
    graded = lambda b: b["reward"] == 1.0 and b["passed"] == len(CASES)  # noqa: E731
    with ServerProcess(env=env) as server, httpx.Client(base_url=server.url, headers=server.headers,
                                                        timeout=300) as http:
        for _ in range(warmup):
            timed_post(http, "/run_code", hello, hello_ok)
            timed_post(http, "/grade", grade_body("c", C_SUM), graded)
            timed_post(http, "/grade", grade_body("python", PY_SUM), graded)
        runs, c_tasks, py_tasks = [], [], []
        for index in range(rounds):  # interleaved, the order alternating: drift hits both sides
            pair = [("c", C_SUM, c_tasks), ("python", PY_SUM, py_tasks)]
            for language, source, into in pair if index % 2 else reversed(pair):
                into.append(timed_post(http, "/grade", grade_body(language, source), graded))
            runs.append(timed_post(http, "/run_code", hello, hello_ok))
    hand = by_hand(rounds, warmup)
    hello_ratio = statistics.median(runs) / statistics.median(hand)
    task_ratio = statistics.median(c_tasks) / statistics.median(py_tasks)
    return {
        "backend": backend, "rounds": rounds, "cpus": os.cpu_count(),
        "c_hello_run_code_ms": median_ms(runs), "c_hello_gcc_and_run_by_hand_ms": median_ms(hand),
        "c_hello_ratio": round(hello_ratio, 3), "c_hello_target": 1.2, "c_hello_meets_target": hello_ratio <= 1.2,
        "stdio_100_cases_c_ms": median_ms(c_tasks), "stdio_100_cases_python_ms": median_ms(py_tasks),
        "stdio_ratio": round(task_ratio, 3), "stdio_target": 1.5, "stdio_meets_target": task_ratio <= 1.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="docker")
    args = parser.parse_args()
    result = measure(args.rounds, args.warmup, args.backend)
    path = write_results("languages", result)
    print(json.dumps(result, indent=1))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
