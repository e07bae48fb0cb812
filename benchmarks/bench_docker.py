"""Issue-3 figures for the Docker backend, with Docker's own floors measured in the same run.

    python benchmarks/bench_docker.py [--rounds 12] [--steps 500] [--churn-s 10] [--out results.json]

Variants are interleaved (A B C A B C ...) and reported as medians, because Docker timings drift
by 10-40 % under neighbour load. Prints a markdown table and writes JSON to --out (default
benchmarks/results/docker.json). Needs a Docker engine and the sandbox image.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docker
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sandbox_env.kernels.docker.config import DockerConfig
from sandbox_env.kernels.docker.containers import cleanup_orphans, container_options, default_image
from sandbox_env.kernels.docker.kernel import DockerKernel
from sandbox_env.policy import load_policy

OWNER = "bench-docker"
LABELS = {"sandbox-env.owner": OWNER}


def ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3) if samples else float("nan")


class Floors:
    """What Docker itself costs: create+start, remove, `docker run --rm`, `docker exec`."""

    def __init__(self, client: docker.DockerClient, image: str, policy: Any) -> None:
        self.client, self.image = client, image
        self.host_config = client.api.create_host_config(network_mode="none", init=True)
        create, host = container_options(policy, image=image, owner=OWNER, episode="floor")
        create.update(command=["sleep", "300"], stdin_open=False, detach=True)
        self.hardened = (create, client.api.create_host_config(**host))
        self.exec_target = self._create_started()[0]

    def _create_started(self, hardened: bool = False) -> tuple[str, float]:
        t0 = time.perf_counter()
        if hardened:
            create, host_config = self.hardened
            cid = self.client.api.create_container(host_config=host_config, **create)["Id"]
        else:
            cid = self.client.api.create_container(self.image, ["sleep", "300"], host_config=self.host_config,
                                                   labels=LABELS)["Id"]
        self.client.api.start(cid)
        return cid, time.perf_counter() - t0

    def create_start_remove(self, hardened: bool = False) -> tuple[float, float]:
        cid, create_start = self._create_started(hardened)
        t0 = time.perf_counter()
        self.client.api.remove_container(cid, force=True)
        return create_start, time.perf_counter() - t0

    def docker_run(self) -> float:
        t0 = time.perf_counter()
        subprocess.run(["docker", "run", "--rm", "--network", "none", self.image, "python3", "-c", "print(1)"],
                       check=True, capture_output=True)
        return time.perf_counter() - t0

    def docker_exec_cli(self) -> float:
        t0 = time.perf_counter()
        subprocess.run(["docker", "exec", self.exec_target, "python3", "-c", "print(1)"], check=True,
                       capture_output=True)
        return time.perf_counter() - t0

    def docker_exec_py(self) -> float:
        t0 = time.perf_counter()
        self.client.api.exec_start(self.client.api.exec_create(self.exec_target, ["python3", "-c", "print(1)"]))
        return time.perf_counter() - t0

    def close(self) -> None:
        self.client.api.remove_container(self.exec_target, force=True)


async def kernel_cold_start(policy: Any) -> tuple[float, float]:
    kernel = DockerKernel(policy, DockerConfig(owner=OWNER))
    t0 = time.perf_counter()
    await kernel.start()
    started = time.perf_counter() - t0
    t0 = time.perf_counter()
    await kernel.close()
    return started, time.perf_counter() - t0


async def step_latency(policy: Any, steps: int) -> list[float]:
    async with DockerKernel(policy, DockerConfig(owner=OWNER)) as kernel:
        for _ in range(20):
            await kernel.execute("print(1)")
        samples = []
        for _ in range(steps):
            t0 = time.perf_counter()
            await kernel.execute("print(1)")
            samples.append(time.perf_counter() - t0)
    return samples


async def churn(policy: Any, floors: Floors, seconds: float) -> tuple[float, float]:
    """Episodes per second (start, one step, close) against create+start+remove, interleaved."""
    episodes = floor_n = 0
    episode_time = floor_time = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        kernel = DockerKernel(policy, DockerConfig(owner=OWNER))
        await kernel.start()
        await kernel.execute("print(1)")
        await kernel.close()
        episode_time += time.perf_counter() - t0
        episodes += 1
        t0 = time.perf_counter()
        await asyncio.to_thread(floors.create_start_remove)
        floor_time += time.perf_counter() - t0
        floor_n += 1
    return episodes / episode_time, floor_n / floor_time


def shim_count() -> int:
    return sum(1 for p in psutil.process_iter(["name"]) if "containerd-shim" in (p.info["name"] or ""))


def container_memory_mib(client: docker.DockerClient, container_id: str) -> tuple[float, float, float]:
    """(cgroup memory.usage_in_bytes, containerd-shim PSS, shim RSS) in MiB, read on the host.

    The shim's RSS counts the Go runtime's text shared by every shim; its PSS is its fair share."""
    usage = float("nan")
    for path in (f"/sys/fs/cgroup/memory/docker/{container_id}/memory.usage_in_bytes",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.current"):
        try:
            usage = int(Path(path).read_text()) / 2**20
            break
        except OSError:
            continue
    pss = rss = 0.0
    for proc in psutil.process_iter(["name", "cmdline"]):
        if "containerd-shim" in (proc.info["name"] or "") and container_id in " ".join(proc.info["cmdline"] or []):
            info = proc.memory_full_info()
            pss, rss = info.pss / 2**20, info.rss / 2**20
    return usage, pss, rss


async def idle_memory(policy: Any, client: docker.DockerClient, count: int) -> dict[str, float]:
    kernels = [DockerKernel(policy, DockerConfig(owner=OWNER)) for _ in range(count)]
    try:
        for kernel in kernels:
            await kernel.start()
        await asyncio.sleep(2)
        readings = [container_memory_mib(client, k.container_id) for k in kernels if k.container_id]
    finally:
        for kernel in kernels:
            await kernel.close()
    cgroup = statistics.median(r[0] for r in readings)
    shim = statistics.median(r[1] for r in readings)
    return {"cgroup_mib": round(cgroup, 2), "shim_pss_mib": round(shim, 2),
            "shim_rss_mib": round(statistics.median(r[2] for r in readings), 2),
            "total_mib": round(cgroup + shim, 2),
            "episodes_per_gib": int(1024 // (cgroup + shim)) if cgroup + shim > 0 else 0}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--churn-s", type=float, default=10.0)
    parser.add_argument("--warm", type=int, default=8, help="warm containers for the memory figure")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "docker.json")
    args = parser.parse_args()
    client = docker.from_env()
    policy = load_policy("default")
    image = default_image()
    cleanup_orphans(OWNER)
    shims_before = shim_count()
    floors = Floors(client, image, policy)
    raw: dict[str, list[float]] = {k: [] for k in ("create_start", "create_start_hardened", "remove", "docker_run", "exec_cli", "exec_py",
                                                   "kernel_start", "kernel_close")}
    try:
        for _ in range(args.rounds):  # interleaved
            create_start, remove = await asyncio.to_thread(floors.create_start_remove)
            raw["create_start"].append(create_start)
            raw["remove"].append(remove)
            raw["create_start_hardened"].append((await asyncio.to_thread(floors.create_start_remove, True))[0])
            started, closed = await kernel_cold_start(policy)
            raw["kernel_start"].append(started)
            raw["kernel_close"].append(closed)
            raw["docker_run"].append(await asyncio.to_thread(floors.docker_run))
            raw["exec_cli"].append(await asyncio.to_thread(floors.docker_exec_cli))
            raw["exec_py"].append(await asyncio.to_thread(floors.docker_exec_py))
        steps = await step_latency(policy, args.steps)
        episodes_per_s, floor_per_s = await churn(policy, floors, args.churn_s)
        memory = await idle_memory(policy, client, args.warm)
    finally:
        floors.close()
    deadline = time.monotonic() + 15  # shims exit a moment after their container
    while shim_count() > shims_before and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    leftovers = {"containers": len(client.containers.list(all=True, filters={"label": f"sandbox-env.owner={OWNER}"})),
                 "extra_shims": shim_count() - shims_before}
    cleanup_orphans(OWNER)
    medians = {k: ms(v) for k, v in raw.items()}
    results = {
        "image": image,
        "medians_ms": {**medians, "step_print1": ms(steps),
                       "step_print1_p90": round(sorted(steps)[int(len(steps) * 0.9)] * 1000, 3)},
        "ratios": {
            "cold_start_vs_create_start": round(medians["kernel_start"] / medians["create_start"], 3),
            "cold_start_vs_create_start_same_options": round(
                medians["kernel_start"] / medians["create_start_hardened"], 3),
            "exec_cli_vs_step": round(medians["exec_cli"] / ms(steps), 1),
            "exec_py_vs_step": round(medians["exec_py"] / ms(steps), 1),
            "churn_vs_floor": round(episodes_per_s / floor_per_s, 3),
        },
        "churn_per_s": {"episodes": round(episodes_per_s, 2), "create_start_remove_floor": round(floor_per_s, 2)},
        "idle_memory": memory,
        "leftovers_after_run": leftovers,
        "rounds": args.rounds, "steps": args.steps,
    }
    rows = [
        ("docker-py create+start (floor)", f"{medians['create_start']} ms", "plain: --network none --init"),
        ("docker-py create+start, our options, `sleep`", f"{medians['create_start_hardened']} ms",
         "same hardening, labels, log driver none"),
        ("docker-py remove(force) (floor)", f"{medians['remove']} ms", ""),
        ("`docker run --rm` print(1)", f"{medians['docker_run']} ms", ""),
        ("`docker exec` print(1), CLI / docker-py", f"{medians['exec_cli']} / {medians['exec_py']} ms", ""),
        ("DockerKernel.start() cold", f"{medians['kernel_start']} ms",
         (f"{results['ratios']['cold_start_vs_create_start']} x plain create+start (target <= 1.2); "
          f"{results['ratios']['cold_start_vs_create_start_same_options']} x with our options")),
        ("DockerKernel.close()", f"{medians['kernel_close']} ms", ""),
        ("execute('print(1)')", f"{ms(steps)} ms (p90 {results['medians_ms']['step_print1_p90']})",
         f"docker exec is {results['ratios']['exec_cli_vs_step']} x slower (CLI)"),
        ("episode churn (start, step, close)", f"{round(episodes_per_s, 2)}/s",
         f"{results['ratios']['churn_vs_floor']} x the create+start+remove floor of {round(floor_per_s, 2)}/s"),
        ("idle memory per warm container", f"{memory['total_mib']} MiB",
         (f"cgroup {memory['cgroup_mib']} + shim PSS {memory['shim_pss_mib']} (RSS {memory['shim_rss_mib']}); "
          f"{memory['episodes_per_gib']} per GiB (target <= 16 MiB)")),
    ]
    print("| what | median | ratio / note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nleft behind: {leftovers}\nwritten to {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
