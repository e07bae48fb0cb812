"""Issue-2 figures for the embedded (Jupyter) backend, with the raw jupyter_client floor measured
in the same run.

    python benchmarks/bench_core.py [--steps 300]

Prints a markdown table and writes benchmarks/results/core.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from _util import ServerProcess, median_ms, write_results
from jupyter_client.manager import start_new_kernel

from sandbox_env import SandboxEnv


def raw_kernel_roundtrips(n: int) -> list[float]:
    """The floor: `print(1)` straight to an ipykernel through jupyter_client, no server."""
    km, kc = start_new_kernel(kernel_name="python3", extra_arguments=[])
    try:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            kc.execute_interactive("print(1)", output_hook=lambda msg: None, timeout=10)
            samples.append(time.perf_counter() - t0)
        return samples
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


async def ws_step_roundtrips(url: str, n: int) -> list[float]:
    async with SandboxEnv(url) as env:
        await env.reset()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            result = await env.step("print(1)")
            samples.append(time.perf_counter() - t0)
            assert result.observation.stdout == "1\n", result.observation
        return samples


async def warm_resets(url: str, n: int, refill_wait_s: float) -> list[float]:
    async with SandboxEnv(url) as env:
        samples = []
        for _ in range(n):
            await asyncio.sleep(refill_wait_s)  # let the pool refill: measure the warm path
            t0 = time.perf_counter()
            await env.reset()
            samples.append(time.perf_counter() - t0)
        return samples


async def concurrent_steps(url: str, sessions: int, steps: int) -> float:
    async def one() -> None:
        async with SandboxEnv(url) as env:
            await env.reset()
            for _ in range(steps):
                await env.step("print(1)")

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(sessions)))
    return sessions * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--resets", type=int, default=10)
    args = parser.parse_args()

    raw_a = raw_kernel_roundtrips(args.steps)
    with ServerProcess("--backend", "jupyter", "--pool-size", "2", "--max-sessions", "16") as server:
        idle_rss = server.rss_mb()
        ws_a = asyncio.run(ws_step_roundtrips(server.url, args.steps))
        raw_b = raw_kernel_roundtrips(args.steps)  # interleaved: A B A B against drift
        ws_b = asyncio.run(ws_step_roundtrips(server.url, args.steps))
        resets = asyncio.run(warm_resets(server.url, args.resets, 1.5))
        t0 = time.perf_counter()
        sequential = asyncio.run(ws_step_roundtrips(server.url, args.steps))
        seq_rate = len(sequential) / (time.perf_counter() - t0)
        aggregate = asyncio.run(concurrent_steps(server.url, 8, args.steps // 2))
        busy_rss = server.rss_mb()
        cold_start = server.cold_start_s

    raw, ws = raw_a + raw_b, ws_a + ws_b
    results: dict[str, Any] = {
        "raw_jupyter_print1_ms": median_ms(raw),
        "ws_step_print1_ms": median_ms(ws),
        "ws_over_raw_ratio": round(median_ms(ws) / median_ms(raw), 3),
        "warm_reset_ms": median_ms(resets),
        "sequential_steps_per_s": round(seq_rate, 1),
        "aggregate_steps_per_s_8_sessions": round(aggregate, 1),
        "cold_start_to_healthy_s": round(cold_start, 3),
        "idle_server_rss_mb": idle_rss,
        "server_rss_after_load_mb": busy_rss,
        "steps": args.steps,
    }
    write_results("core", results)
    print("| metric | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    sys.exit(main())
