"""Issue-12 figure: SandboxFusion's `POST /run_code` of a Python `print(1)` against our own `POST /step`.

    python benchmarks/bench_sandboxfusion.py [--rounds 60] [--warmup 5] [--backend jupyter]

One `sandbox-env serve` (default backend and policy); each round sends `/run_code` then `/step`
(order alternating between rounds), both `print(1)`, one request at a time over one keep-alive
HTTP connection; every reply is checked (stdout "1\\n"). Reports the medians, p90s and the ratio of
medians (target: /run_code <= 1.2 x /step), and where a run's time goes (`execution_time`: the
program's own wall time, as the server measured it). One run, no assertion on time.
Writes JSON to benchmarks/results/sandboxfusion.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _util import ServerProcess, median_ms, write_results

TARGET_RATIO = 1.2
RUN_CODE = {"code": "print(1)", "language": "python"}
STEP = {"action": {"code": "print(1)"}}


def p90_ms(samples: list[float]) -> float:
    return round(sorted(samples)[int(0.9 * (len(samples) - 1))] * 1000, 3)


def run_code(http: httpx.Client, inner: list[float]) -> float:
    started = time.perf_counter()
    reply = http.post("/run_code", json=RUN_CODE)
    elapsed = time.perf_counter() - started
    body = reply.json()
    if reply.status_code != 200 or body["status"] != "Success" or body["run_result"]["stdout"] != "1\n":
        raise RuntimeError(f"/run_code: {reply.status_code} {body}")
    inner.append(float(body["run_result"]["execution_time"]))
    return elapsed


def step(http: httpx.Client) -> float:
    started = time.perf_counter()
    reply = http.post("/step", json=STEP)
    elapsed = time.perf_counter() - started
    body = reply.json()
    if reply.status_code != 200 or body["observation"]["stdout"] != "1\n":
        raise RuntimeError(f"/step: {reply.status_code} {body}")
    return elapsed


def measure(rounds: int, warmup: int, backend: str) -> dict[str, Any]:
    env = {"SANDBOX_ENV_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    with ServerProcess(env=env) as server, httpx.Client(base_url=server.url, headers=server.headers,
                                                        timeout=120) as http:
        inner: list[float] = []
        for _ in range(warmup):
            run_code(http, inner)
            step(http)
        inner.clear()
        runs: list[float] = []
        steps: list[float] = []
        for index in range(rounds):
            if index % 2:
                steps.append(step(http))
                runs.append(run_code(http, inner))
            else:
                runs.append(run_code(http, inner))
                steps.append(step(http))
    ratio = statistics.median(runs) / statistics.median(steps)
    return {
        "backend": backend, "rounds": rounds, "cpus": os.cpu_count(),
        "run_code_ms": {"median": median_ms(runs), "p90": p90_ms(runs)},
        "step_ms": {"median": median_ms(steps), "p90": p90_ms(steps)},
        "run_code_program_wall_ms": {"median": median_ms(inner), "p90": p90_ms(inner)},
        "ratio_of_medians": round(ratio, 3), "target_ratio": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backend", default="jupyter")
    args = parser.parse_args()
    result = measure(args.rounds, args.warmup, args.backend)
    path = write_results("sandboxfusion", result)
    print(result)
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
