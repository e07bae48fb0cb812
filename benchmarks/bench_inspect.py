"""Issue-11 figures: inspection, export and replay, as ratios within one run.

    python benchmarks/bench_inspect.py [--backend jupyter|docker] [--samples 50]

One `sandbox-env serve` on loopback. Measured, in order: a `print(1)` step over /ws (median);
`GET /episodes/{id}` of the idle episode (median; target <= 2x the step); the same while a
`time.sleep(30)` step runs (p95; target <= 100 ms); `GET /episodes/{id}/notebook` of a 100-step
episode (median; target <= 200 ms); and replaying that notebook in a fresh sandbox with
`sandbox_env.replay.replay` (nbclient; the kernel's start included) against the reset and 100
steps over /ws that recorded it (target <= 1.5x). Writes benchmarks/results/inspect.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from _util import ServerProcess, median_ms, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox_env import SandboxEnv


def p95_ms(samples: list[float]) -> float:
    return round(sorted(samples)[max(0, int(len(samples) * 0.95) - 1)] * 1000, 3)


async def timed(call: Any) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def measure(url: str, headers: dict[str, str], samples: int) -> dict[str, Any]:
    import nbformat

    from sandbox_env.replay import replay

    out: dict[str, Any] = {}
    async with SandboxEnv(url) as env, httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        await env.reset(episode_id="bench-inspect")
        await env.step("x = list(range(1000))")
        steps = [await timed(lambda: env.step("print(1)")) for _ in range(samples)]
        idle = [await timed(lambda: http.get("/episodes/bench-inspect")) for _ in range(samples)]
        out["step_print1_ms"] = median_ms(steps)
        out["inspect_idle_ms"] = median_ms(idle)
        out["inspect_idle_over_step"] = round(statistics.median(idle) / statistics.median(steps), 2)
        sleeper = asyncio.create_task(env.step("import time\ntime.sleep(30)"))
        while not (await http.get("/episodes/bench-inspect")).json()["running"]:
            await asyncio.sleep(0.01)
        busy = [await timed(lambda: http.get("/episodes/bench-inspect")) for _ in range(samples)]
        assert not sleeper.done()
        out["inspect_busy_p95_ms"] = p95_ms(busy)
        out["inspect_busy_median_ms"] = median_ms(busy)
        sleeper.cancel()
    # A 100-step episode: recorded over /ws, exported, replayed.
    async with SandboxEnv(url) as env, httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        start = time.perf_counter()
        await env.reset(episode_id="bench-100")
        for i in range(100):
            await env.step(f"v{i % 7} = {i} * {i}\nprint({i}, v{i % 7})")
        recorded_s = time.perf_counter() - start
        exports = [await timed(lambda: http.get("/episodes/bench-100/notebook")) for _ in range(max(5, samples // 5))]
        body = (await http.get("/episodes/bench-100/notebook")).text
    out["ws_100_steps_s"] = round(recorded_s, 3)
    out["export_100_steps_ms"] = median_ms(exports)
    out["export_bytes"] = len(body)
    nb = nbformat.reads(body, as_version=4)
    start = time.perf_counter()
    done = await replay(nb, backend=nb.metadata["sandbox_env"]["backend"])  # our own recording: its backend
    replay_s = time.perf_counter() - start
    out["replay_100_steps_s"] = round(replay_s, 3)
    out["replay_over_ws"] = round(replay_s / recorded_s, 2)
    out["replay_sandbox_start_s"] = round(done.start_s, 3)
    out["replay_steps_over_ws"] = round((replay_s - done.start_s) / recorded_s, 2)  # a fresh sandbox's start aside
    out["replay_all_same"] = done.same
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="jupyter")
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    with ServerProcess("--backend", args.backend, "--pool-size", "1") as server:
        figures = asyncio.run(measure(server.url, server.headers, args.samples))
    figures["backend"] = args.backend
    targets = {"inspect_busy_p95_ms": figures["inspect_busy_p95_ms"] <= 100,
               "inspect_idle_over_step": figures["inspect_idle_over_step"] <= 2,
               "export_100_steps_ms": figures["export_100_steps_ms"] <= 200,
               "replay_over_ws": figures["replay_over_ws"] <= 1.5}
    figures["targets_met"] = targets
    print(json.dumps(figures, indent=2))
    write_results(f"inspect-{args.backend}", figures)


if __name__ == "__main__":
    main()
