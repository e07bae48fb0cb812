"""Issue-12 figure: one GRPO-like step against one server, and the share of it that is our overhead.

    python benchmarks/bench_grpo.py [--rollouts 64] [--steps 2] [--loop 600000] [--pool-size N]

One `sandbox-env serve` (default backend, `--max-sessions` = rollouts). A step is what TRL does
for one generation batch: every rollout's environment (`AsyncSandboxToolEnv`, our TRL class,
one instance per rollout, reused across steps) is reset onto a task, then all rollouts run
concurrently, each making 4 tool calls (`run_python`: small set-up code, a CPU loop, a function
and its check, a second CPU loop), then the 64 completions are scored at once by `code_reward`.
A first, unmeasured step opens the sessions; then each step is timed.

Overhead share (docs/benchmarks.md): `ideal` is what the step would take if sandboxing,
transport and the server cost nothing: the larger of the longest rollout's own code CPU time
(a rollout's calls are sequential) and the code's CPU time over all rollouts divided by this
machine's cores (it cannot run faster than the cores allow). CPU, not the calls' measured
`wall_time_s`: with 64 kernels on 2 cores a call's wall is mostly waiting for a core, behind
other code and behind our own processes, so it would hide our cost. `overhead = (wall - ideal) /
wall`. Resets and the reward
phase count wholly as overhead (conservative: the gradings' own run time is in it).
Writes JSON to benchmarks/results/grpo.json. One run, no assertion on time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from _util import ServerProcess, write_results

from sandbox_env.client.trl import AsyncSandboxToolEnv, code_reward

TARGET_OVERHEAD = 0.10
TASK = {
    "id": "add-two", "prompt": "Write add(a, b) returning the sum.",
    "tests": {"kind": "asserts", "asserts": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]},
}
# Each rollout's answer differs (as a GRPO group's do): the batch grades every one of them.
ANSWER = "Here it is:\n```python\ndef add(a, b):\n    return a + b  # rollout {}\n```"


def calls(loop_n: int, rollout: int) -> list[str]:
    cpu = f"s = 0\nfor i in range({loop_n}):\n    s += i * i % 7\nprint(s)"
    return [
        f"import math, json\ndata = [math.sqrt(i) for i in range(1000)]\nprint(len(data), {rollout})",
        cpu,
        "def add(a, b):\n    return a + b\nprint(add(2, 3), json.dumps({'ok': True}))",
        cpu,
    ]


async def rollout(env: AsyncSandboxToolEnv, codes: list[str]) -> tuple[float, float]:
    wall = cpu = 0.0
    for code in codes:
        await env.run_python(code)
        obs = env.last_observation
        run = obs.execution if obs is not None else None  # the kernel's own measurement
        if run is None or run.status.value != "ok":
            raise RuntimeError(f"tool call failed: {obs}")
        wall += run.wall_time_s
        cpu += run.cpu_time_s if run.cpu_time_s is not None else run.wall_time_s
    return wall, cpu


def one_step(envs: list[AsyncSandboxToolEnv], loop_n: int, url: str) -> dict[str, Any]:
    started = time.perf_counter()
    for env in envs:  # TRL resets each rollout's environment in turn, from its training thread
        env.reset(task=TASK)
    resets_s = time.perf_counter() - started

    async def all_rollouts() -> list[tuple[float, float]]:
        return list(await asyncio.gather(*(rollout(e, calls(loop_n, i)) for i, e in enumerate(envs))))

    per_rollout = asyncio.run(all_rollouts())
    rollouts_s = time.perf_counter() - started - resets_s
    rewards = code_reward([ANSWER.format(i) for i in range(len(envs))], task=[TASK] * len(envs), base_url=url)
    wall = time.perf_counter() - started
    if rewards != [1.0] * len(envs):
        raise RuntimeError(f"unexpected rewards: {rewards}")
    cores = os.cpu_count() or 1
    code_wall = sum(w for w, _ in per_rollout)
    code_cpu = sum(c for _, c in per_rollout)
    ideal = max(max(c for _, c in per_rollout), code_cpu / cores)
    return {"wall_s": round(wall, 3), "resets_s": round(resets_s, 3), "rollouts_s": round(rollouts_s, 3),
            "rewards_s": round(wall - resets_s - rollouts_s, 3), "code_wall_sum_s": round(code_wall, 3),
            "code_cpu_sum_s": round(code_cpu, 3), "longest_rollout_code_s": round(max(w for w, _ in per_rollout), 3),
            "ideal_s": round(ideal, 3), "overhead_share": round((wall - ideal) / wall, 4),
            # machine time (wall x cores) a tool call cost beyond its code's own CPU, and a reset's
            "per_call_overhead_ms": round((rollouts_s * cores - code_cpu) / (4 * len(envs)) * 1000, 2),
            "per_reset_ms": round(resets_s / len(envs) * 1000, 2),
            "rollout_phase_overhead_share": round((rollouts_s - ideal) / rollouts_s, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--loop", type=int, default=600_000, help="iterations of each CPU loop")
    parser.add_argument("--pool-size", type=int, default=None, help="the server's --pool-size")
    parser.add_argument("--log", type=Path, default=None, help="where the server's output goes")
    args = parser.parse_args()
    # Open episodes and gradings both count as sessions: the envs hold theirs while code_reward grades.
    server_args = ["--max-sessions", str(2 * args.rollouts + 4)]
    if args.pool_size is not None:
        server_args += ["--pool-size", str(args.pool_size)]
    with ServerProcess(*server_args, log=args.log) as server:
        class Env(AsyncSandboxToolEnv):
            base_url = server.url

        envs = [Env() for _ in range(args.rollouts)]
        try:
            warmup = one_step(envs, args.loop, server.url)
            steps = [one_step(envs, args.loop, server.url) for _ in range(args.steps)]
        finally:
            for env in envs:
                env.close()
    best = min(steps, key=lambda s: s["overhead_share"])
    data = {"rollouts": args.rollouts, "tool_calls_per_rollout": 4, "loop": args.loop,
            "cores": os.cpu_count(), "server_args": server_args, "warmup": warmup, "steps": steps,
            "target_overhead_share": TARGET_OVERHEAD,
            "meets_target": all(s["overhead_share"] <= TARGET_OVERHEAD for s in steps)}
    path = write_results("grpo", data)
    for s in steps:
        print(f"step {s['wall_s']} s (resets {s['resets_s']}, rollouts {s['rollouts_s']}, rewards "
              f"{s['rewards_s']}); code cpu {s['code_cpu_sum_s']} s, ideal {s['ideal_s']} s; "
              f"per call {s['per_call_overhead_ms']} ms, per reset {s['per_reset_ms']} ms; "
              f"overhead {s['overhead_share']:.1%} (rollout phase {s['rollout_phase_overhead_share']:.1%})")
    print(f"best overhead {best['overhead_share']:.1%} (target <= {TARGET_OVERHEAD:.0%}); wrote {path}")


if __name__ == "__main__":
    main()
