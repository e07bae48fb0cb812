"""Issue-13 figures for the Jupyter backend: a kernel forked from the kernel template against one
bwrap starts from scratch (`template.FORKING = False`), in the same process, interleaved.

    python benchmarks/bench_kernel_start.py [--rounds 10] [--kernels 6]

Per round and per path: one kernel started, 10 `print(1)` steps, closed (wall time of `start()`
to a kernel that answered kernel_info, and the CPU time of its cgroup by then), then `--kernels` kept open at once
to weigh them: the PSS (`/proc/<pid>/smaps_rollup`) of this process's whole tree, with the
templates, before and after, divided by their number. Needs a root server with cgroups (the
template's condition). Prints a markdown table and writes benchmarks/results/kernel_start.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

from _util import write_results

from sandbox_env.kernels.jupyter import template
from sandbox_env.kernels.jupyter.kernel import JupyterKernel
from sandbox_env.policy import load_policy

PATHS = ("forked", "exec")


def tree_pss_kib(pid: int) -> int:
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):  # children of every thread
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack += [int(p) for p in f.read().split()]
            with open(f"/proc/{current}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


async def one_start(path: str, steps: list[float] | None = None) -> tuple[float, float]:
    """(start wall time, CPU of the kernel by then); with `steps`, then 10 `print(1)` steps timed."""
    template.FORKING = path == "forked"
    kernel = JupyterKernel(load_policy("default"))
    t0 = time.perf_counter()
    await kernel.start()
    wall = time.perf_counter() - t0
    cpu = kernel._cur.conf.cpu_time_s() if kernel._cur is not None else None
    for _ in range(10 if steps is not None else 0):
        t0 = time.perf_counter()
        await kernel.execute("print(1)")
        steps.append(time.perf_counter() - t0)  # type: ignore[union-attr]
    await kernel.close()
    return wall, cpu or 0.0


async def pss_per_kernel(path: str, count: int) -> float:
    template.FORKING = path == "forked"
    first = JupyterKernel(load_policy("default"))  # the template (if any) runs before the baseline
    await first.start()
    await asyncio.sleep(0.5)
    before = tree_pss_kib(os.getpid())
    kernels = [JupyterKernel(load_policy("default")) for _ in range(count)]
    for kernel in kernels:
        await kernel.start()
        await kernel.execute("x = 1")
    await asyncio.sleep(1.0)
    after = tree_pss_kib(os.getpid())
    for kernel in [first, *kernels]:
        await kernel.close()
    return (after - before) / count / 1024


async def main(args: argparse.Namespace) -> dict[str, Any]:
    walls: dict[str, list[float]] = {p: [] for p in PATHS}
    cpus: dict[str, list[float]] = {p: [] for p in PATHS}
    pss: dict[str, list[float]] = {p: [] for p in PATHS}
    steps: dict[str, list[float]] = {p: [] for p in PATHS}
    await one_start("forked")  # the templates' own start is not a kernel's
    for round_ in range(args.rounds):
        for path in PATHS if round_ % 2 == 0 else reversed(PATHS):
            wall, cpu = await one_start(path, steps[path])
            walls[path].append(wall)
            cpus[path].append(cpu)
    for path in PATHS:
        pss[path].append(await pss_per_kernel(path, args.kernels))
    med = {p: (statistics.median(walls[p]) * 1000, statistics.median(cpus[p]) * 1000, statistics.median(pss[p]),
               statistics.median(steps[p]) * 1000) for p in PATHS}
    print("| what | forked from the template | started by bwrap | forked is |")
    print("|---|---|---|---|")
    print(f"| kernel start, median | {med['forked'][0]:.1f} ms | {med['exec'][0]:.1f} ms | "
          f"{med['exec'][0] / med['forked'][0]:.1f} x faster |")
    print(f"| CPU of the kernel's cgroup by then, median | {med['forked'][1]:.0f} ms | {med['exec'][1]:.0f} ms | "
          f"{med['exec'][1] / max(med['forked'][1], 1e-9):.1f} x less |")
    print(f"| PSS per extra open kernel | {med['forked'][2]:.1f} MiB | {med['exec'][2]:.1f} MiB | "
          f"{med['exec'][2] / med['forked'][2]:.1f} x less |")
    print(f"| a `print(1)` step, median | {med['forked'][3]:.2f} ms | {med['exec'][3]:.2f} ms | "
          f"{med['exec'][3] / med['forked'][3]:.2f} x |")
    print(f"load average after: {os.getloadavg()}")
    return {"walls_s": walls, "cpus_s": cpus, "pss_mib": pss, "steps_s": steps, "load": os.getloadavg()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kernels", type=int, default=6)
    write_results("kernel_start", asyncio.run(main(parser.parse_args())))
