"""Issue-9 soak: thousands of episodes through one real server, per backend; its memory stays
bounded and nothing of it is left once it stops.

    python benchmarks/bench_soak.py [--episodes 2000] [--backends jupyter,docker] [--concurrency 4]

Per backend: `sandbox-env serve` in a subprocess (auth on, the token from SANDBOX_ENV_TOKEN, so
the server's memory is read from /proc/<pid>/status with no client in it), then `--episodes`
episodes through `sandbox_env.SandboxEnv`, `--concurrency` at a time. Each episode: reset, a step
that prints, a step that raises, a step that reads the first one's variable back, close. The
server's VmRSS, open fds and threads are recorded at quiescent checkpoints (no session open, the
warm pool given `--settle-s` to refill): after the first `--warmup` episodes and every
`--every` after, and at the end; the figure is end RSS / warm-up RSS (issue 9: <= 1.2).
Then the server gets SIGTERM, and what it left is counted: processes (anything it started that
still runs, anything naming its work directories), cgroups, containers (by the docker
backend's `sandbox-env.server` label) and their shims and cgroups, and work directories.

The docker part holds `flock /tmp/dockerd.lock` throughout, so no dockerd restart (a fault test
running alongside) happens under it. Writes benchmarks/results/soak.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from _util import RESULTS_DIR, ServerProcess, write_results

from sandbox_env import SandboxEnv
from sandbox_env.models import ExecStatus

DOCKER_LOCK = "/tmp/dockerd.lock"
SERVER_LABEL = "sandbox-env.server"  # sandbox_env.kernels.docker.containers.SERVER_LABEL: "<pid>:<start ticks>"


# -- the server's own figures ---------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, Any]:
    """VmRSS (MiB), threads and open fds of `pid`, from /proc."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def start_ticks(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start ticks) of every live process below `pid` (kernels, bwrap, relays, the reaper)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.add((child, start_ticks(child)))
        todo += children.get(child, [])
    return found


class ProcessWatch:
    """Samples the server's process tree in a thread: every process it ever started that lived
    for at least one sample (a kernel lives for seconds, a sample is taken every `interval_s`)."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.seen: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="process-watch")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= descendants(self.pid)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def alive(self) -> list[str]:
        """Those still running (a zombie, exited and about to be reaped by init, is not)."""
        return [f"process {pid} ({_cmdline(pid)[:80]})" for pid, ticks in sorted(self.seen)
                if ticks and start_ticks(pid) == ticks and _state(pid) not in ("Z", "X", "")]


class ContainerWatch:
    """Ids of every container the server created, from the engine's event stream (its backlog
    is too short to ask afterwards)."""

    def __init__(self, instance: str) -> None:
        import docker

        self.client = docker.from_env(timeout=60)
        self.instance = instance
        self.ids: set[str] = set()
        stream = docker.from_env(timeout=None)  # a read timeout would end the stream between events
        self._events = stream.events(since=int(time.time()) - 5, decode=True,
                                          filters={"type": "container", "event": "create",
                                                   "label": f"{SERVER_LABEL}={instance}"})
        self._thread = threading.Thread(target=self._run, daemon=True, name="container-watch")
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the stream ends when stop() closes it
            for event in self._events:
                self.ids.add(event.get("id") or event.get("Actor", {}).get("ID", ""))

    def stop(self) -> None:
        time.sleep(1.0)  # events of the last removals are in flight
        self._events.close()
        self._thread.join(10)

    def left(self) -> list[str]:
        """Containers still labelled with this server; shims and cgroups of any it created."""
        found = [f"container {c['Id'][:12]} ({c.get('State')})"
                 for c in self.client.api.containers(all=True, filters={"label": f"{SERVER_LABEL}={self.instance}"})]
        ids = {i for i in self.ids if i}
        if ids:
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    line = _cmdline(int(entry))
                    found += [f"process {entry} ({line[:80]})" for i in ids if i in line][:1]
            for ctrl in Path("/sys/fs/cgroup").iterdir():
                for parent in (ctrl / "docker", ctrl / "system.slice", ctrl):
                    if parent.is_dir():
                        found += [f"cgroup {parent / name}" for name in os.listdir(parent)
                                  if any(i in name for i in ids)]
        return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def leftovers(pid: int, processes: ProcessWatch, containers: ContainerWatch | None) -> dict[str, list[str]]:
    """What still names the stopped server `pid`, by kind."""
    from sandbox_env.kernels.jupyter.cgroups import cgroup_layout
    from sandbox_env.server.reaper import processes_naming

    named = [f"process {p} ({_cmdline(p)[:80]})" for p in processes_naming(f"sandbox-env-{pid}-".encode())]
    cgroups = [f"cgroup {d}" for parent in cgroup_layout()[1].values() if parent.is_dir()
               for d in parent.glob(f"{pid}-*")]
    found = {
        "processes": sorted(set(processes.alive()) | set(named)),
        "cgroups": cgroups,
        "workdirs": [f"workdir {d}" for d in Path(tempfile.gettempdir()).glob(f"sandbox-env-{pid}-*")],
        "containers": [],
    }
    if containers is not None:
        for line in containers.left():
            kind = line.split(" ", 1)[0]
            found[{"container": "containers", "process": "processes", "cgroup": "cgroups"}[kind]].append(line)
    return found


# -- the episodes ---------------------------------------------------------------------------------

class Tally:
    def __init__(self) -> None:
        self.done = 0
        self.failures: dict[str, int] = {}
        self.first_failure: str | None = None


async def episode(url: str, n: int, tally: Tally) -> None:
    try:
        async with SandboxEnv(url, message_timeout_s=120, connect_retries=5) as env:
            await env.reset()
            printed = await env.step(f"x = {n}\nprint('episode', x)")
            assert printed.observation.stdout == f"episode {n}\n", printed.observation
            raised = await env.step("1 / 0")
            assert raised.observation.status == ExecStatus.ERROR, raised.observation
            assert raised.observation.exception is not None
            assert raised.observation.exception.type == "ZeroDivisionError", raised.observation
            again = await env.step("print(x * 2)")
            assert again.observation.stdout == f"{2 * n}\n", again.observation
    except Exception as exc:  # noqa: BLE001 - counted and reported: a soak goes on
        key = type(exc).__name__
        tally.failures[key] = tally.failures.get(key, 0) + 1
        tally.first_failure = tally.first_failure or f"{key}: {exc}"[:500]
    tally.done += 1


async def run_episodes(url: str, first: int, count: int, concurrency: int, tally: Tally) -> None:
    numbers = iter(range(first, first + count))

    async def worker() -> None:
        for n in numbers:
            await episode(url, n, tally)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def quiesce(url: str, headers: dict[str, str], settle_s: float) -> None:
    """Until no episode is open (closing comes after the last reply), then `settle_s` for the
    warm pool to refill: each checkpoint sees the server in the same state."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", headers=headers, timeout=10).json()["active_sessions"] == 0:
                break
        time.sleep(0.1)
    time.sleep(settle_s)


@contextlib.contextmanager
def docker_lock(backend: str) -> Iterator[None]:
    """Hold /tmp/dockerd.lock while anything runs on the docker backend (see the docstring)."""
    if backend != "docker":
        yield
        return
    with open(DOCKER_LOCK, "a") as lock:
        print("waiting for", DOCKER_LOCK, file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def soak(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    log = Path(tempfile.gettempdir()) / f"bench-{args.out}-{backend}.log"
    log.write_bytes(b"")
    options = ["--backend", backend, "--pool-size", str(args.pool_size), "--max-sessions", str(max(8, 2 * args.concurrency))]
    with docker_lock(backend):
        server = ServerProcess(*options, log=log)
        server.__enter__()
        assert server.proc is not None
        pid = server.proc.pid
        processes = ProcessWatch(pid)
        containers = ContainerWatch(f"{pid}:{start_ticks(pid)}") if backend == "docker" else None
        checkpoints: list[dict[str, Any]] = []
        tally = Tally()
        stop: dict[str, Any] = {}
        try:
            quiesce(server.url, server.headers, args.settle_s)
            checkpoints.append({"episodes": 0, **proc_status(pid)})
            started = time.perf_counter()
            busy_s = 0.0
            marks = [args.warmup, *range(args.warmup + args.every, args.episodes, args.every), args.episodes]
            done = 0
            for mark in sorted(set(m for m in marks if 0 < m <= args.episodes)):
                t0 = time.perf_counter()
                asyncio.run(run_episodes(server.url, done, mark - done, args.concurrency, tally))
                busy_s += time.perf_counter() - t0
                done = mark
                quiesce(server.url, server.headers, args.settle_s)
                checkpoints.append({"episodes": done, **proc_status(pid), "elapsed_s": round(time.perf_counter() - started, 1)})
                print(f"{backend}: {checkpoints[-1]} failures={tally.failures}", file=sys.stderr, flush=True)
        finally:
            t0 = time.perf_counter()
            server.proc.send_signal(signal.SIGTERM)
            try:
                stop["exit_code"] = server.proc.wait(120)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                stop["exit_code"], stop["killed"] = server.proc.wait(), True
            stop["stop_s"] = round(time.perf_counter() - t0, 2)
            processes.stop()
            if containers is not None:
                containers.stop()
        # Removal of a container can finish a moment after the server exits: look again for a while.
        left = at_exit = leftovers(pid, processes, containers)
        deadline = time.monotonic() + 30
        while any(left.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            left = leftovers(pid, processes, containers)
    warm = next(c for c in checkpoints if c["episodes"] == min(args.warmup, args.episodes))
    end = checkpoints[-1]
    return {
        "episodes": args.episodes,
        "concurrency": args.concurrency,
        "steps_per_episode": 3,
        "pool_size": args.pool_size,
        "episodes_per_s": round(args.episodes / busy_s, 2),
        "wall_s": round(busy_s, 1),
        "failures": tally.failures,
        "first_failure": tally.first_failure,
        "warmup_episodes": warm["episodes"],
        "rss_mb_idle": checkpoints[0]["rss_mb"],
        "rss_mb_after_warmup": warm["rss_mb"],
        "rss_mb_at_end": end["rss_mb"],
        "rss_end_over_warmup": round(end["rss_mb"] / warm["rss_mb"], 3),
        "fds_after_warmup": warm["fds"], "fds_at_end": end["fds"],
        "threads_after_warmup": warm["threads"], "threads_at_end": end["threads"],
        "checkpoints": checkpoints,
        "server_stop": stop,
        "processes_seen": len(processes.seen),
        "containers_seen": len(containers.ids) if containers is not None else None,
        "leftovers_at_exit": at_exit,  # looked at again for up to 30 s: `leftovers`
        "leftovers": left,
        "left_total": sum(map(len, left.values())),
        "server_log": str(log),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--backends", default="jupyter,docker")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=100, help="the RSS baseline: after this many episodes")
    parser.add_argument("--every", type=int, default=250, help="a checkpoint every this many episodes")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--settle-s", type=float, default=3.0, help="pause before each checkpoint")
    parser.add_argument("--out", default="soak", help="results/<out>.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run stops its server too
    path = RESULTS_DIR / f"{args.out}.json"
    import json

    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}  # keep other backends' runs
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        results[backend] = {**soak(backend, args), "date": time.strftime("%Y-%m-%d"),
                            "load_avg_at_end": [round(x, 1) for x in os.getloadavg()]}
        write_results(args.out, results)
    print("| backend | episodes | episodes/s | RSS after warm-up | RSS at end | ratio | fds | threads | failures | left |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for backend, r in results.items():
        print(f"| {backend} | {r['episodes']} | {r['episodes_per_s']} | {r['rss_mb_after_warmup']} MiB "
              f"({r['warmup_episodes']}) | {r['rss_mb_at_end']} MiB | {r['rss_end_over_warmup']} | "
              f"{r['fds_after_warmup']} -> {r['fds_at_end']} | {r['threads_after_warmup']} -> {r['threads_at_end']} | "
              f"{sum(r['failures'].values())} | {r['left_total']} |")


if __name__ == "__main__":
    sys.exit(main())
