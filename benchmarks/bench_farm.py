"""Issue-10 figures: the farm (compose.yaml, 2 replicas under docker-compose) in one run.

    python benchmarks/bench_farm.py [--rounds 5] [--steps 40] [--sessions 200]

1. `docker-compose up -d` to the gateway's first 200 on /readyz, and to both replicas ready
   (the images built beforehand: `sandbox-env images build --all`).
2. Step median through the gateway against straight to one replica (its address on the farm's
   bridge, which the host reaches), two `/ws` sessions stepping `print(1)` alternately (A B A B).
3. `--sessions` concurrent `/ws` sessions opened through the gateway (reset + one step, all held
   open together): how many each replica got, max/min.
4. After `docker-compose down -v`: sandbox containers, containers, networks and volumes of the
   farm's left. Prints a table and writes benchmarks/results/farm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from _util import write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "farm")]
from farm_helpers import COMPOSE_FILES, Farm, compose_command, docker, farm_env, leftovers, run  # noqa: E402

from sandbox_env import SandboxEnv  # noqa: E402


def up(tmp: Path) -> tuple[Farm, list[str], dict[str, float]]:
    env, token = farm_env(tmp)
    project = "sbxfarmbench"
    base = [*(compose_command() or []), "-p", project, *(a for p in COMPOSE_FILES[:1] for a in ("-f", str(p)))]
    farm = Farm("compose", project, env["SANDBOX_FARM_URL"], token, "", env)
    started = time.perf_counter()
    run(base + ["up", "-d"], env)
    first = None
    while True:
        try:
            if httpx.get(farm.url + "/readyz", timeout=2, trust_env=False).status_code == 200:
                first = first or time.perf_counter() - started
                lines = farm.replicas()
                if len(lines) == 2 and all(line["status"] == "ready" for line in lines):
                    break
        except httpx.HTTPError:
            pass
        if time.perf_counter() - started > 180:
            raise SystemExit("the farm did not come up in 180 s")
        time.sleep(0.05)
    return farm, base, {"up_to_readyz_s": round(first or 0, 2), "up_to_all_ready_s": round(time.perf_counter() - started, 2)}


def replica_address(farm: Farm) -> str:
    cid = farm.server_containers()[0]
    ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid).strip()
    return f"http://{ip}:8000"


async def step_medians(farm: Farm, direct: str, rounds: int, steps: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {"gateway": [], "direct": []}
    async with SandboxEnv(farm.url, token=farm.token) as via, SandboxEnv(direct, token=farm.token) as straight:
        await via.reset()
        await straight.reset()
        for env in (via, straight):  # warm both paths
            await env.step("print(1)")
        for _ in range(rounds):
            for _ in range(steps):
                for name, env in (("gateway", via), ("direct", straight)):
                    started = time.perf_counter()
                    await env.step("print(1)")
                    samples[name].append(time.perf_counter() - started)
    gateway, straight_ms = (statistics.median(samples[k]) * 1000 for k in ("gateway", "direct"))
    return {"step_gateway_ms": round(gateway, 3), "step_direct_ms": round(straight_ms, 3),
            "step_ratio": round(gateway / straight_ms, 3)}


async def spread(farm: Farm, sessions: int) -> dict[str, Any]:
    envs = [SandboxEnv(farm.url, token=farm.token, message_timeout_s=600, connect_timeout_s=60) for _ in range(sessions)]

    async def open_one(env: SandboxEnv) -> str:
        await env.reset()
        await env.step("print(1)")
        return (await env.state()).episode_id.split(".", 1)[0]

    try:
        owners = Counter(await asyncio.gather(*(open_one(env) for env in envs)))
    finally:
        await asyncio.gather(*(env.close() for env in envs), return_exceptions=True)
    counts = sorted(owners.values())
    return {"sessions": sessions, "per_replica": dict(owners),
            "spread_max_over_min": round(counts[-1] / counts[0], 3) if len(counts) == 2 else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        farm, base, figures = up(Path(tmp))
        try:
            figures.update(asyncio.run(step_medians(farm, replica_address(farm), args.rounds, args.steps)))
            figures.update(asyncio.run(spread(farm, args.sessions)))
        finally:
            farm.replicas()
            run(base + ["down", "-v", "--timeout", "30"], farm.env, check=False)
        deadline, left = time.monotonic() + 60, leftovers(farm)
        while any(left.values()) and time.monotonic() < deadline:
            time.sleep(1)
            left = leftovers(farm)
        figures["left_after_down"] = {k: len(v) for k, v in left.items()}
    load = Path("/proc/loadavg").read_text().split()[:3]
    figures["load_average"] = " ".join(load)
    for key, value in figures.items():
        print(f"| {key} | {value} |")
    print("wrote", write_results("farm", figures))


if __name__ == "__main__":
    main()
