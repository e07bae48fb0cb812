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


async def raw_async_kernel_roundtrips(n: int) -> list[float]:
    """A second floor: jupyter_client's asyncio client over ipc sockets, as our backend uses."""
    import tempfile

    from jupyter_client import AsyncKernelManager

    with tempfile.TemporaryDirectory() as tmp:
        km = AsyncKernelManager(transport="ipc", ip=f"{tmp}/k")
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                await kc.execute_interactive("print(1)", output_hook=lambda msg: None, timeout=10)
                samples.append(time.perf_counter() - t0)
            return samples
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)


async def ws_step_roundtrips(url: str, n: int, token: str | None = None) -> list[float]:
    async with SandboxEnv(url, token=token) as env:
        await env.reset()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            result = await env.step("print(1)")
            samples.append(time.perf_counter() - t0)
            assert result.observation.stdout == "1\n", result.observation
        return samples


async def warm_resets(url: str, n: int, refill_wait_s: float, token: str | None = None) -> list[float]:
    async with SandboxEnv(url, token=token) as env:
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


async def cold_resets(url: str, n: int) -> list[float]:
    """Pool size 0: every reset starts its kernel (a container for docker) on the spot."""
    samples = []
    for _ in range(n):
        async with SandboxEnv(url) as env:
            t0 = time.perf_counter()
            await env.reset()
            samples.append(time.perf_counter() - t0)
    return samples


async def churn(url: str, episodes: int) -> float:
    """Episodes per second, each a new session: reset, one step, close."""
    t0 = time.perf_counter()
    for _ in range(episodes):
        async with SandboxEnv(url) as env:
            await env.reset()
            await env.step("print(1)")
    return episodes / (time.perf_counter() - t0)


def docker_floors(rounds: int) -> dict[str, list[float]]:
    """`docker run --rm` and docker-py create+start of the sandbox image, same run."""
    import subprocess

    import docker

    from sandbox_env.kernels.docker.containers import default_image

    client, image = docker.from_env(), default_image()
    floors: dict[str, list[float]] = {"docker_run": [], "create_start": [], "docker_exec": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run(["docker", "run", "--rm", "--network", "none", image, "python3", "-c", "print(1)"],
                       check=True, capture_output=True)
        floors["docker_run"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        container = client.containers.create(image, ["sleep", "60"], network_mode="none", init=True)
        container.start()
        floors["create_start"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(["docker", "exec", container.id, "python3", "-c", "print(1)"], check=True,
                       capture_output=True)
        floors["docker_exec"].append(time.perf_counter() - t0)
        container.remove(force=True)
    return floors


def leftover_containers() -> int:
    import docker

    return len(docker.from_env().containers.list(all=True, filters={"label": "sandbox-env.owner"}))


def bench_docker_server(args: argparse.Namespace) -> dict[str, Any]:
    floors = docker_floors(args.resets)
    with ServerProcess("--backend", "docker", "--pool-size", "2") as server:
        steps = asyncio.run(ws_step_roundtrips(server.url, args.steps))
        resets = asyncio.run(warm_resets(server.url, args.resets, 0.5))
        rate = asyncio.run(churn(server.url, args.churn))
    with ServerProcess("--backend", "docker", "--pool-size", "0") as server:
        cold = asyncio.run(cold_resets(server.url, args.resets))
    deadline = time.monotonic() + 10  # auto-removal finishes a moment after close
    while leftover_containers() and time.monotonic() < deadline:
        time.sleep(0.2)
    return {
        "docker_ws_step_print1_ms": median_ms(steps),
        "docker_warm_reset_ms": median_ms(resets),
        "docker_run_print1_ms": median_ms(floors["docker_run"]),
        "docker_exec_print1_ms": median_ms(floors["docker_exec"]),
        "docker_exec_over_ws_step": round(median_ms(floors["docker_exec"]) / median_ms(steps), 1),
        "docker_cold_reset_ms": median_ms(cold),
        "docker_py_create_start_ms": median_ms(floors["create_start"]),
        "docker_cold_reset_over_create_start": round(median_ms(cold) / median_ms(floors["create_start"]), 3),
        "docker_churn_episodes_per_s": round(rate, 2),
        "docker_churn_episodes": args.churn,
        "docker_containers_left": leftover_containers(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--resets", type=int, default=10)
    parser.add_argument("--churn", type=int, default=100, help="episodes in the docker churn run")
    parser.add_argument("--backends", default="jupyter,docker,isolation,auth")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if "jupyter" in args.backends:
        results.update(bench_jupyter_server(args))
    if "docker" in args.backends:
        results.update(bench_docker_server(args))
    if "isolation" in args.backends:
        results.update(jupyter_isolation_costs(args))
    if "auth" in args.backends:
        results.update(auth_overhead(args))
    write_results("core", results)
    print("| metric | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value} |")


def bench_jupyter_server(args: argparse.Namespace) -> dict[str, Any]:
    raw_a = raw_kernel_roundtrips(args.steps)
    with ServerProcess("--backend", "jupyter", "--pool-size", "2", "--max-sessions", "16") as server:
        idle_rss = server.rss_mb()
        ws_a = asyncio.run(ws_step_roundtrips(server.url, args.steps))
        raw_b = raw_kernel_roundtrips(args.steps)  # interleaved: A B A B against drift
        ws_b = asyncio.run(ws_step_roundtrips(server.url, args.steps))
        raw_async = asyncio.run(raw_async_kernel_roundtrips(args.steps))
        ws_c = asyncio.run(ws_step_roundtrips(server.url, args.steps))
        resets = asyncio.run(warm_resets(server.url, args.resets, 1.5))
        t0 = time.perf_counter()
        sequential = asyncio.run(ws_step_roundtrips(server.url, args.steps))
        seq_rate = len(sequential) / (time.perf_counter() - t0)
        aggregate = asyncio.run(concurrent_steps(server.url, 8, args.steps // 2))
        busy_rss = server.rss_mb()
        cold_start = server.cold_start_s

    raw, ws = raw_a + raw_b, ws_a + ws_b + ws_c
    floor = min(median_ms(raw), median_ms(raw_async))
    results: dict[str, Any] = {
        "raw_jupyter_print1_ms": median_ms(raw),
        "ws_step_print1_ms": median_ms(ws),
        "raw_jupyter_async_ipc_print1_ms": median_ms(raw_async),
        "ws_over_fastest_raw_ratio": round(median_ms(ws) / floor, 3),
        "warm_reset_ms": median_ms(resets),
        "sequential_steps_per_s": round(seq_rate, 1),
        "aggregate_steps_per_s_8_sessions": round(aggregate, 1),
        "cold_start_to_healthy_s": round(cold_start, 3),
        "idle_server_rss_mb": idle_rss,
        "server_rss_after_load_mb": busy_rss,
        "steps": args.steps,
    }
    return results


def jupyter_isolation_costs(args: argparse.Namespace) -> dict[str, Any]:
    """Issue-8 figures for the sandboxed kernel, ratios from one run: a step against raw
    jupyter_client on the same (sandboxed) kernel, kernel start against an unisolated start,
    and the warm reset of a server whose kernels are sandboxed."""
    from sandbox_env.kernels.jupyter.config import JupyterConfig
    from sandbox_env.kernels.jupyter.kernel import JupyterKernel
    from sandbox_env.policy import load_policy
    from sandbox_env.settings import Settings

    policy = load_policy("default")
    unisolated = Settings(jupyter_unisolated=True)

    async def starts() -> tuple[list[float], list[float]]:
        sandboxed, plain = [], []
        for _ in range(args.resets):  # interleaved against drift
            for settings, samples in ((None, sandboxed), (unisolated, plain)):
                kernel = JupyterKernel(policy, JupyterConfig.from_settings(settings))
                t0 = time.perf_counter()
                await kernel.start()
                samples.append(time.perf_counter() - t0)
                await kernel.close()
        return sandboxed, plain

    async def steps() -> tuple[list[float], list[float]]:
        import queue

        kernel = JupyterKernel(policy)
        await kernel.start()
        kc = kernel._cur.km.client()  # type: ignore[union-attr]  # straight to the kernel's own sockets
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        try:
            await kc.wait_for_ready(timeout=60)
            ours, raw = [], []
            for _ in range(args.steps):  # interleaved against drift
                t0 = time.perf_counter()
                result = await kernel.execute("print(1)")
                ours.append(time.perf_counter() - t0)
                assert result.stdout == "1\n", result
                while True:  # our step's broadcasts reached this client too: not timed
                    try:
                        await kc.get_iopub_msg(timeout=0.01)
                    except queue.Empty:
                        break
                t0 = time.perf_counter()
                await kc.execute_interactive("print(1)", output_hook=lambda msg: None, timeout=10)
                raw.append(time.perf_counter() - t0)
            return ours, raw
        finally:
            kc.stop_channels()
            await kernel.close()

    sandboxed_starts, plain_starts = asyncio.run(starts())
    ours, raw = asyncio.run(steps())
    with ServerProcess("--backend", "jupyter", "--pool-size", "2") as server:
        resets = asyncio.run(warm_resets(server.url, args.resets, 1.5))
    return {
        "isolated_step_print1_ms": median_ms(ours),
        "raw_jupyter_client_same_kernel_ms": median_ms(raw),
        "isolated_step_over_raw_ratio": round(median_ms(ours) / median_ms(raw), 3),
        "isolated_kernel_start_ms": median_ms(sandboxed_starts),
        "unisolated_kernel_start_ms": median_ms(plain_starts),
        "isolated_start_over_unisolated_ratio": round(median_ms(sandboxed_starts) / median_ms(plain_starts), 3),
        "isolated_warm_reset_ms": median_ms(resets),
    }


async def session_opens(url: str, n: int, token: str | None) -> list[float]:
    """A new /ws session (handshake, through the gate) and its first reply."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with SandboxEnv(url, token=token) as env:
            await env.state()
        samples.append(time.perf_counter() - t0)
    return samples


def http_requests(url: str, n: int, headers: dict[str, str]) -> list[float]:
    import httpx

    samples = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            http.get("/schema").raise_for_status()
            samples.append(time.perf_counter() - t0)
    return samples


def guard_cost_us(n: int = 20000) -> float:
    """The gate alone, in process: Host, Origin, token lookup (constant-time over every token)."""
    from sandbox_env.server.auth import TokenTable
    from sandbox_env.server.guard import Guard, HostPolicy

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    token = "t" * 48
    guard = Guard(app, hosts=HostPolicy("127.0.0.1", []), origins=[], tokens=TokenTable({"admin": token}))
    scope = {"type": "http", "method": "GET", "path": "/schema", "query_string": b"", "headers": [
        (b"host", b"127.0.0.1:8000"), (b"authorization", f"Bearer {token}".encode())]}

    async def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await guard(dict(scope), None, None)  # type: ignore[arg-type]
        return (time.perf_counter() - t0) / n

    return round(asyncio.run(run()) * 1e6, 2)


def auth_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Issue-9 figures: the same server with and without auth, measured interleaved (A B A B)."""
    common = ("--backend", "jupyter", "--pool-size", "2", "--max-sessions", "16")
    with ServerProcess(*common) as authed, ServerProcess(*common, "--no-auth") as open_:
        # token None: SANDBOX_ENV_TOKEN (the authed server's); "": send none
        sides = {"auth": (authed, None, authed.headers), "noauth": (open_, "", {})}
        steps: dict[str, list[float]] = {k: [] for k in sides}
        resets: dict[str, list[float]] = {k: [] for k in sides}
        opens: dict[str, list[float]] = {k: [] for k in sides}
        https: dict[str, list[float]] = {k: [] for k in sides}
        rounds = 10  # short alternating rounds: load that comes and goes hits both sides alike
        for _ in range(rounds):
            for key, (server, token, headers) in sides.items():
                steps[key] += asyncio.run(ws_step_roundtrips(server.url, max(args.steps // rounds, 10), token))
                resets[key] += asyncio.run(warm_resets(server.url, max(args.resets // 3, 2), 1.0, token))
                opens[key] += asyncio.run(session_opens(server.url, 10, token))
                https[key] += http_requests(server.url, 60, headers)

    def added(samples: dict[str, list[float]]) -> float:
        return round(median_ms(samples["auth"]) - median_ms(samples["noauth"]), 3)

    return {
        "auth_ws_step_ms": median_ms(steps["auth"]),
        "noauth_ws_step_ms": median_ms(steps["noauth"]),
        "auth_over_noauth_ws_step_ratio": round(median_ms(steps["auth"]) / median_ms(steps["noauth"]), 3),
        "auth_warm_reset_ms": median_ms(resets["auth"]),
        "noauth_warm_reset_ms": median_ms(resets["noauth"]),
        "auth_added_to_reset_ms": added(resets),
        "auth_session_open_ms": median_ms(opens["auth"]),
        "noauth_session_open_ms": median_ms(opens["noauth"]),
        "auth_added_to_session_open_ms": added(opens),
        "auth_http_request_ms": median_ms(https["auth"]),
        "noauth_http_request_ms": median_ms(https["noauth"]),
        "auth_added_to_http_request_ms": added(https),
        "guard_per_request_us": guard_cost_us(),
    }


if __name__ == "__main__":
    sys.exit(main())
