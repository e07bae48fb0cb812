"""Issue-13 figures: how fast a Docker server hands out a clean sandbox, with recycling on (the
default policy) and off (the same policy with `reuses = 0`), in the same run.

    python benchmarks/bench_turnover.py [--rounds 3] [--resets 20] [--churn-s 10] [--steps 40]

Two `sandbox-env serve --backend docker` processes on loopback (pool of 2 each) run side by side;
every measurement alternates between them (A B A B ...) and is reported as a median, because
Docker timings drift under neighbour load. Measured: back-to-back `/ws` resets in one session (no
pause: the pool gets no time to refill), churn (a new `/ws` session per episode: reset, a
`print(1)` step, close) for `--churn-s` seconds in all per server, and HTTP `POST /step` of
`print(1)` (OpenEnv's stateless step: a throwaway episode per request). Then the servers' own
count of kernels handed out fresh or recycled (`/metrics`), and the containers left once both
have stopped. Prints a markdown table and writes benchmarks/results/turnover.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import httpx
from _util import ServerProcess, median_ms, write_results

from sandbox_env import SandboxEnv

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("recycled", "fresh")


def policy_without_recycling(folder: Path) -> Path:
    """The default policy with `reuses = 0`, under the name `fresh`."""
    text = (ROOT / "policies" / "default.toml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("reuses")]
    path = folder / "fresh.toml"
    path.write_text("\n".join([*lines, "reuses = 0", ""]))
    return path


async def back_to_back_resets(url: str, n: int) -> list[float]:
    async with SandboxEnv(url) as env:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await env.reset()
            samples.append(time.perf_counter() - t0)
        return samples


async def churn(url: str, seconds: float) -> tuple[int, float]:
    """(episodes, seconds): a new session per episode, reset, one step, close, back to back."""
    t0, episodes = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        async with SandboxEnv(url) as env:
            await env.reset()
            result = await env.step("print(1)")
            assert result.observation.stdout == "1\n", result.observation
        episodes += 1
    return episodes, time.perf_counter() - t0


def http_steps(url: str, headers: dict[str, str], n: int) -> list[float]:
    samples = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            reply = http.post("/step", json={"action": {"code": "print(1)"}})
            samples.append(time.perf_counter() - t0)
            assert reply.status_code == 200 and reply.json()["observation"]["stdout"] == "1\n", reply.text
    return samples


def handed_out(server: ServerProcess) -> dict[str, float]:
    """The server's counters: kernels handed out by source, recycle refusals by reason."""
    text = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        for family, label in (("sandbox_env_kernels_handed_out_total", "source"),
                              ("sandbox_env_recycle_refusals_total", "reason")):
            if line.startswith(family + "{"):
                value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
                key = value if label == "source" else f"refused_{value}"
                counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def containers_left(pids: list[int]) -> int:
    """Containers still labelled with one of these server processes."""
    found = docker.from_env().api.containers(all=True, filters={"label": "sandbox-env.server"})
    return sum(1 for c in found if c["Labels"]["sandbox-env.server"].split(":")[0] in map(str, pids))


def measure(servers: dict[str, ServerProcess], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    resets: dict[str, list[float]] = {side: [] for side in SIDES}
    steps: dict[str, list[float]] = {side: [] for side in SIDES}
    churned = {side: [0, 0.0] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:  # interleaved: A B A B
            server = servers[side]
            time.sleep(args.settle_s)  # both start each measurement from a full pool
            resets[side] += asyncio.run(back_to_back_resets(server.url, args.resets))
            time.sleep(args.settle_s)
            episodes, seconds = asyncio.run(churn(server.url, args.churn_s / args.rounds))
            churned[side][0] += episodes
            churned[side][1] += seconds
            time.sleep(args.settle_s)
            steps[side] += http_steps(server.url, server.headers, args.steps)
    return {side: {"ws_resets_back_to_back_median_ms": median_ms(resets[side]),
                   "ws_resets_back_to_back_mean_ms": mean_ms(resets[side]),
                   "ws_resets_back_to_back_p90_ms": round(statistics.quantiles(resets[side], n=10)[-1] * 1000, 3),
                   "churn_episodes_per_s": round(churned[side][0] / churned[side][1], 2),
                   "churn_episodes": churned[side][0],
                   "http_step_print1_median_ms": median_ms(steps[side]),
                   "http_step_print1_mean_ms": mean_ms(steps[side]),
                   "handed_out": handed_out(servers[side])} for side in SIDES}


def mean_ms(samples: list[float]) -> float:
    """Beside the median: without recycling, the times are bimodal (a warm container, or a wait
    for a start), and the median falls on either side from run to run."""
    return round(statistics.fmean(samples) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resets", type=int, default=20, help="back-to-back resets per round")
    parser.add_argument("--churn-s", type=float, default=10.0, help="churn seconds per server, all rounds")
    parser.add_argument("--steps", type=int, default=40, help="HTTP /step requests per round")
    parser.add_argument("--settle-s", type=float, default=1.0, help="pause before each measurement")
    args = parser.parse_args()
    common = ("--backend", "docker", "--pool-size", "2", "--log-level", "warning")
    with tempfile.TemporaryDirectory() as folder:
        fresh_policy = policy_without_recycling(Path(folder))
        with ServerProcess(*common) as recycling, ServerProcess(*common, "--policy", str(fresh_policy)) as fresh:
            results: dict[str, Any] = measure({"recycled": recycling, "fresh": fresh}, args)
            pids = [server.proc.pid for server in (recycling, fresh) if server.proc is not None]
    deadline = time.monotonic() + 15  # removals finish a moment after the servers stop
    while containers_left(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    on, off = results["recycled"], results["fresh"]
    results["ratios"] = {
        "ws_resets_back_to_back": round(off["ws_resets_back_to_back_median_ms"] / on["ws_resets_back_to_back_median_ms"], 1),
        "churn": round(on["churn_episodes_per_s"] / off["churn_episodes_per_s"], 1),
        "http_step_print1": round(off["http_step_print1_median_ms"] / on["http_step_print1_median_ms"], 1),
        "ws_resets_back_to_back_mean": round(off["ws_resets_back_to_back_mean_ms"] / on["ws_resets_back_to_back_mean_ms"], 1),
        "http_step_print1_mean": round(off["http_step_print1_mean_ms"] / on["http_step_print1_mean_ms"], 1),
    }
    results["containers_left"] = containers_left(pids)
    results["settings"] = vars(args)
    write_results("turnover", results)
    print("| metric | recycling on | off (reuses = 0) | on is ... x better |\n|---|---|---|---|")
    for key, ratio in (("ws_resets_back_to_back_median_ms", "ws_resets_back_to_back"),
                       ("ws_resets_back_to_back_mean_ms", "ws_resets_back_to_back_mean"),
                       ("churn_episodes_per_s", "churn"), ("http_step_print1_median_ms", "http_step_print1"),
                       ("http_step_print1_mean_ms", "http_step_print1_mean")):
        print(f"| {key} | {on[key]} | {off[key]} | {results['ratios'][ratio]} |")
    print(f"| handed out | {on['handed_out']} | {off['handed_out']} | |")
    print(f"containers left: {results['containers_left']}", file=sys.stderr)


if __name__ == "__main__":
    main()
