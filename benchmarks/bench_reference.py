"""Issue-13 side by side: sandbox-env (Jupyter and Docker backends) against OpenEnv's reference
`coding_env`, which isolates nothing (smolagents' AST interpreter inside the server process), in
one run on this machine, interleaved, through OpenEnv's own client.

    python benchmarks/bench_reference.py [--rounds 2] [--resets 20] [--spaced 4] [--steps 20]
        [--ws-steps 30] [--sessions 6] [--reference-python /work/ref/venv/bin/python]
        [--reference-dir /work/ref/OpenEnv] [--reference-cmd '... {port} ...']

The reference is OpenEnv's own code, kept outside this repository, in a virtualenv of its own (so
that its dependencies do not touch sandbox-env's):

    # the OpenEnv repository (github.com/huggingface/OpenEnv, formerly meta-pytorch/OpenEnv):
    # only envs/coding_env is needed
    git clone --depth 1 https://github.com/huggingface/OpenEnv /work/ref/OpenEnv
    python3 -m venv /work/ref/venv
    /work/ref/venv/bin/pip install "openenv[core]==0.10.0" "smolagents>=1.22.0,<2" "uvicorn[standard]"
    /work/ref/venv/bin/pip install --no-deps /work/ref/OpenEnv/envs/coding_env

(`openenv` at the version sandbox-env's own client side has installed; coding_env's pyproject
asks for `openenv[core]>=0.2.2`, `smolagents>=1.22,<2` and `uvicorn[standard]`.) The benchmark
runs `reference_server.py` (beside this file) with that virtualenv's Python: OpenEnv's
`create_app` over coding_env's `PythonCodeActEnv`, as its `server/app.py` does, but allowing more
than one session (the stock app allows one; the memory figure needs several). Without the
`pip install` of coding_env, `--reference-dir` (the OpenEnv checkout, or its `envs/coding_env`)
puts it on the path instead. `--reference-cmd` runs any other command (`{port}` is replaced), e.g.
the stock app: `/work/ref/venv/bin/uvicorn coding_env.server.app:app --host 127.0.0.1 --port
{port}` (one session: the memory figure is then left out).

Three servers run side by side on loopback: the reference, `sandbox-env serve` (jupyter, pool of
2) and `sandbox-env serve --backend docker` (pool of 2; auth on, the token from the environment as
in the other benchmarks). Every measurement goes reference, Jupyter, Docker in turn, `--rounds`
times, each after the servers have quiesced (their sandbox counts steady) and `--settle-s`:

* 20 `/ws` resets back to back in one session (`GenericEnvClient`, OpenEnv's client), median;
* `/ws` resets 1.5 s apart (the pool has refilled), `--spaced` per round, median;
* HTTP `POST /step` `print(1)` (OpenEnv's stateless step: a fresh episode each), one client
  (httpx, keep-alive), `--steps` per round: the median, and steps per second over the loop;
* `/ws` steps in one session (`print(1)` and a 10,000-iteration loop), median: the "no loss
  elsewhere" ratios;
* memory per extra open session, once per server at the end: the PSS (`/proc/<pid>/smaps_rollup`)
  summed over the server's process tree (Jupyter kernels are in it) and, for Docker, over every
  process of the server's containers (`docker top`) and their containerd shims; then `--sessions`
  more sessions are opened (connect, reset, a `print(1)` step) and held while the pools refill,
  and the difference of the sums is divided by their number. dockerd's and containerd's own
  growth is not counted.

Prints a markdown table (with sandbox-env's figures as multiples of the reference's) and writes
benchmarks/results/reference.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import httpx
import psutil
from _util import ServerProcess, median_ms, write_results
from bench_turnover import containers_left, handed_out
from openenv.core import GenericEnvClient

HERE = Path(__file__).resolve().parent
SIDES = ("reference", "jupyter", "docker")
POOL = 2
LOOP = "s = 0\nfor i in range(10000):\n    s += i\nprint(s)"
VERBOSE = False  # --verbose: how long each measurement and each wait took


class ReferenceServer(ServerProcess):
    """OpenEnv's coding_env server, started from its own virtualenv; no auth."""

    def __init__(self, args: argparse.Namespace, log: Path | None) -> None:
        super().__init__(log=log)
        if args.reference_cmd:
            self.args = shlex.split(args.reference_cmd.format(port=self.port))
        else:
            self.args = [args.reference_python, str(HERE / "reference_server.py"), "--port", str(self.port),
                         "--max-sessions", str(args.sessions + 4)]
        # Nothing of ours on its path, and no token to it.
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SANDBOX_ENV_TOKEN", "VIRTUAL_ENV")}
        if args.reference_dir:
            root = Path(args.reference_dir).resolve()
            self.env["PYTHONPATH"] = str(root / "envs" if (root / "envs" / "coding_env").is_dir() else root.parent)
        self.token, self.headers = None, {}


# --- what each server has running -------------------------------------------------------------

def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def containers(server_pid: int) -> list[dict[str, Any]]:
    found = docker.from_env().api.containers(filters={"label": "sandbox-env.server", "status": "running"})
    return [c for c in found if c["Labels"]["sandbox-env.server"].split(":")[0] == str(server_pid)]


def sandboxes(side: str, pid: int) -> int:
    """How many sandboxes (kernels) the server has: warm in its pool or held by a session."""
    if side == "docker":
        return len(containers(pid))
    if side == "jupyter":
        count = 0
        for proc in tree(pid):
            try:  # a kernel bwrap started, or the holder of a kernel forked from the template
                argv = proc.cmdline()
                count += (proc.name().startswith("python") and "ipykernel_launcher" in argv) or argv == ["sleep", "infinity"]
            except psutil.Error:
                pass
        return count
    return 0


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def memory(side: str, pid: int) -> dict[str, int]:
    """PSS in KiB: the server's process tree; for Docker, its containers' processes and shims."""
    parts = {"server_tree": sum(pss_kib(p.pid) for p in tree(pid)), "containers": 0, "shims": 0, "processes": len(tree(pid))}
    if side == "docker":
        api = docker.from_env().api
        for container in containers(pid):
            try:
                top = api.top(container["Id"])
                column = top["Titles"].index("PID")
                pids = [int(row[column]) for row in top["Processes"] or []]
                init = api.inspect_container(container["Id"])["State"]["Pid"]
                shim = psutil.Process(init).ppid()
            except (docker.errors.APIError, psutil.Error, ValueError):
                continue  # going away
            parts["containers"] += sum(pss_kib(p) for p in pids)
            parts["shims"] += pss_kib(shim)
            parts["processes"] += len(pids) + 1
    parts["total"] = parts["server_tree"] + parts["containers"] + parts["shims"]
    return parts


async def quiesce(sides: dict[str, ServerProcess], at_least: int = POOL, timeout_s: float = 60.0) -> None:
    """Until each sandbox-env server's sandbox count has held still for a second, at `at_least` or
    more (its pool refilled): no server is starting sandboxes while another is measured."""
    await asyncio.gather(*(steady(side, server, at_least, timeout_s) for side, server in sides.items() if side != "reference"))


async def steady(side: str, server: ServerProcess, at_least: int, timeout_s: float) -> None:
    assert server.proc is not None
    start, last, since = time.monotonic(), -1, time.monotonic()
    while time.monotonic() < start + timeout_s:
        count = sandboxes(side, server.proc.pid)
        if count != last:
            last, since = count, time.monotonic()
        elif count >= at_least and time.monotonic() - since >= 1.0:
            break
        await asyncio.sleep(0.2)
    else:
        print(f"{side}: sandboxes did not settle at {at_least} or more in {timeout_s} s (now {last})", file=sys.stderr)
    if VERBOSE:
        print(f"  quiesce {side}: {time.monotonic() - start:.1f} s, {last} sandboxes", file=sys.stderr)


# --- measurements -----------------------------------------------------------------------------

def client(server: ServerProcess) -> GenericEnvClient:
    return GenericEnvClient(base_url=server.url, headers=server.headers or None)


def stdout(result: Any) -> str:
    return str(result.observation.get("stdout", ""))


async def back_to_back_resets(server: ServerProcess, args: argparse.Namespace) -> dict[str, list[float]]:
    async with client(server) as env:
        samples = []
        for _ in range(args.resets):
            t0 = time.perf_counter()
            await env.reset()
            samples.append(time.perf_counter() - t0)
    return {"resets_back_to_back": samples}


async def spaced_resets(server: ServerProcess, args: argparse.Namespace) -> dict[str, list[float]]:
    async with client(server) as env:
        await env.reset()
        samples = []
        for _ in range(args.spaced):
            await asyncio.sleep(args.spacing_s)
            t0 = time.perf_counter()
            await env.reset()
            samples.append(time.perf_counter() - t0)
    return {"resets_spaced": samples}


async def http_steps(server: ServerProcess, args: argparse.Namespace) -> dict[str, list[float]]:
    samples = []
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
        t_loop = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            reply = await http.post("/step", json={"action": {"code": "print(1)"}})
            samples.append(time.perf_counter() - t0)
            assert reply.status_code == 200 and reply.json()["observation"]["stdout"] == "1\n", reply.text
        loop = time.perf_counter() - t_loop
    return {"http_steps": samples, "http_loop_s": [loop]}


async def ws_steps(server: ServerProcess, args: argparse.Namespace) -> dict[str, list[float]]:
    async with client(server) as env:
        await env.reset()
        out: dict[str, list[float]] = {"ws_print1": [], "ws_loop": []}
        for _ in range(args.ws_steps):
            for key, code, expected in (("ws_print1", "print(1)", "1\n"), ("ws_loop", LOOP, "49995000\n")):
                t0 = time.perf_counter()
                result = await env.step({"code": code})
                out[key].append(time.perf_counter() - t0)
                assert stdout(result) == expected, result
    return out


async def memory_per_session(side: str, server: ServerProcess, sides: dict[str, ServerProcess],
                             args: argparse.Namespace) -> dict[str, Any]:
    """Run first, on pools as the servers filled them (a Docker pool keeps up to twice its size of
    recycled containers once episodes have ended, which would serve the new sessions without a
    start). The sessions are opened one at a time, each once the pool has refilled behind the last
    (a session that found the pool empty would make the refill aim higher than its size)."""
    assert server.proc is not None
    await quiesce(sides)
    await asyncio.sleep(args.settle_s)
    before = memory(side, server.proc.pid)
    before_count = sandboxes(side, server.proc.pid)
    envs = []
    try:
        for n in range(1, args.sessions + 1):
            env = client(server)
            await env.connect()
            envs.append(env)
            await env.reset()
            assert stdout(await env.step({"code": "print(1)"})) == "1\n"
            if side != "reference":  # the pool refills behind the session
                await quiesce({side: server}, at_least=before_count + n, timeout_s=120)
        await asyncio.sleep(args.settle_s)
        after = memory(side, server.proc.pid)
        after_count = sandboxes(side, server.proc.pid)
    except Exception as error:  # noqa: BLE001 - e.g. the stock one-session reference: capacity reached
        print(f"{side}: memory per session not measured: {error!r}", file=sys.stderr)
        return {"error": repr(error)}
    finally:
        for env in envs:
            try:
                await env.close()
            except Exception:  # noqa: BLE001 - closing is best effort here
                pass
    return {"per_session_mib": round((after["total"] - before["total"]) / args.sessions / 1024, 2),
            "before_kib": before, "after_kib": after, "sandboxes_before": before_count, "sandboxes_after": after_count,
            "per_session_parts_mib": {k: round((after[k] - before[k]) / args.sessions / 1024, 2)
                                      for k in ("server_tree", "containers", "shims")}}


def mean_ms(samples: list[float]) -> float:
    """Beside the median: where a reset or a stateless step may wait for a sandbox to start, the
    times are bimodal."""
    return round(statistics.fmean(samples) * 1000, 3)


def p90_ms(samples: list[float]) -> float:
    return round(statistics.quantiles(samples, n=10)[-1] * 1000, 3) if len(samples) > 1 else float("nan")


Measure = Callable[[ServerProcess, argparse.Namespace], Awaitable[dict[str, list[float]]]]


async def measure(sides: dict[str, ServerProcess], args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    memories = {}
    for side, server in sides.items():
        t0 = time.monotonic()
        memories[side] = await memory_per_session(side, server, sides, args)
        if VERBOSE:
            print(f"memory {side}: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    measures: list[Measure] = [back_to_back_resets, spaced_resets, http_steps, ws_steps]
    for n in range(args.rounds):
        for fn in measures:
            for side, server in sides.items():  # interleaved: reference, jupyter, docker, ...
                await quiesce(sides)
                await asyncio.sleep(args.settle_s)
                t0 = time.monotonic()
                for key, values in (await fn(server, args)).items():
                    samples[side].setdefault(key, []).extend(values)
                if VERBOSE:
                    print(f"{fn.__name__} {side}: {time.monotonic() - t0:.1f} s", file=sys.stderr)
        print(f"round {n + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    results: dict[str, Any] = {}
    for side, got in samples.items():
        results[side] = {
            "ws_resets_back_to_back_median_ms": median_ms(got["resets_back_to_back"]),
            "ws_resets_back_to_back_mean_ms": mean_ms(got["resets_back_to_back"]),
            "ws_resets_back_to_back_p90_ms": p90_ms(got["resets_back_to_back"]),
            "ws_reset_refilled_median_ms": median_ms(got["resets_spaced"]),
            "http_step_print1_median_ms": median_ms(got["http_steps"]),
            "http_step_print1_mean_ms": mean_ms(got["http_steps"]),
            "http_step_print1_p90_ms": p90_ms(got["http_steps"]),
            "http_steps_per_s": round(len(got["http_steps"]) / sum(got["http_loop_s"]), 1),
            "ws_step_print1_median_ms": median_ms(got["ws_print1"]),
            "ws_step_loop10k_median_ms": median_ms(got["ws_loop"]),
            "samples": {key: len(values) for key, values in got.items()},
        }
        if side != "reference":
            results[side]["handed_out"] = handed_out(sides[side])
        results[side]["memory"] = memories[side]
        results[side]["pss_per_extra_session_mib"] = memories[side].get("per_session_mib")
    return results


ROWS = (  # (label, key, unit)
    ("{resets} `/ws` resets back to back, median", "ws_resets_back_to_back_median_ms", "ms"),
    ("the same, mean", "ws_resets_back_to_back_mean_ms", "ms"),
    ("`/ws` reset when the pool has refilled ({spacing} s apart), median", "ws_reset_refilled_median_ms", "ms"),
    ("HTTP `/step` `print(1)` (a fresh episode each), median", "http_step_print1_median_ms", "ms"),
    ("the same, mean", "http_step_print1_mean_ms", "ms"),
    ("HTTP steps/s, one client", "http_steps_per_s", "/s"),
    ("PSS per extra open session", "pss_per_extra_session_mib", "MiB"),
    ("`/ws` step `print(1)`, median", "ws_step_print1_median_ms", "ms"),
    ("`/ws` step, a 10,000-iteration loop, median", "ws_step_loop10k_median_ms", "ms"),
)


def ratio(ours: Any, reference: Any) -> Any:
    if not isinstance(ours, int | float) or not isinstance(reference, int | float) or reference == 0:
        return None
    return round(ours / reference, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--resets", type=int, default=20, help="back-to-back /ws resets per round")
    parser.add_argument("--spaced", type=int, default=4, help="/ws resets --spacing-s apart per round")
    parser.add_argument("--spacing-s", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=20, help="HTTP /step requests per round")
    parser.add_argument("--ws-steps", type=int, default=30, help="/ws steps of each kind per round")
    parser.add_argument("--sessions", type=int, default=6, help="extra sessions opened for the memory figure")
    parser.add_argument("--settle-s", type=float, default=0.5, help="pause before each measurement, once the pools are steady")
    parser.add_argument("--reference-python", default=os.environ.get("REFERENCE_PYTHON", "/work/ref/venv/bin/python"))
    parser.add_argument("--reference-dir", default=None, help="OpenEnv checkout (or its envs/coding_env) to put on the path")
    parser.add_argument("--reference-cmd", default=None, help="command for the reference server, {port} replaced")
    parser.add_argument("--log", type=Path, default=None, help="append the servers' output to this file")
    parser.add_argument("--verbose", action="store_true", help="how long each measurement and each wait took")
    args = parser.parse_args()
    if not args.reference_cmd and not Path(args.reference_python).exists():
        parser.error(f"no {args.reference_python}: set up the reference as this script's docstring says, "
                     "or pass --reference-python / --reference-cmd")
    global VERBOSE
    VERBOSE = args.verbose
    load_before = os.getloadavg()
    common = ("--pool-size", str(POOL), "--log-level", "warning")
    with (ReferenceServer(args, args.log) as reference, ServerProcess(*common, log=args.log) as jupyter,
          ServerProcess("--backend", "docker", *common, log=args.log) as dock):
        sides: dict[str, ServerProcess] = {"reference": reference, "jupyter": jupyter, "docker": dock}
        results: dict[str, Any] = asyncio.run(measure(sides, args))
        results["cold_start_s"] = {side: round(server.cold_start_s, 3) for side, server in sides.items()}
        docker_pid = dock.proc.pid if dock.proc is not None else -1
    deadline = time.monotonic() + 15  # removals finish a moment after the server stops
    while containers_left([docker_pid]) and time.monotonic() < deadline:
        time.sleep(0.2)
    results["containers_left"] = containers_left([docker_pid])
    results["ratios"] = {side: {key: ratio(results[side][key], results["reference"][key]) for _, key, _ in ROWS}
                         for side in ("jupyter", "docker")}
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results("reference", results)
    print("| figure | reference | Jupyter | Docker | Jupyter / reference | Docker / reference |\n|---|---|---|---|---|---|")
    for label, key, unit in ROWS:
        cells = [f"{results[side][key]} {unit}" if results[side][key] is not None else "n/a" for side in SIDES]
        ratios = [f"{results['ratios'][side][key]} x" if results["ratios"][side][key] is not None else "n/a" for side in SIDES[1:]]
        print(f"| {label.format(resets=args.resets, spacing=args.spacing_s)} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    print(f"load average before {load_before}, after {results['load_average']['after']}; "
          f"containers left: {results['containers_left']}", file=sys.stderr)


if __name__ == "__main__":
    main()
