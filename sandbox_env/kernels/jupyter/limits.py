"""Confine a process tree: its own cgroup (v1 or v2) where the machine allows it, rlimits otherwise.

Generic on purpose (no Jupyter here): the caller creates a `Confinement`, passes `preexec` to the
child it launches (the child moves itself into the cgroups and sets its rlimits before exec, so it
never runs a line unconfined), and later calls `kill_all()` / `destroy()`, which kill *every*
process of the tree, setsid daemons included (they stay in the cgroup). Without cgroups, processes
are found by session id and by a token placed in their environment: good against accidents only.

Where the cgroups go: `cgroups.py`; the /proc scans of the fallback: `procfs.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sandbox_env.kernels.jupyter.cgroups import cgroup_layout, read_int, write_value
from sandbox_env.kernels.jupyter.procfs import alive, count_user_processes, scan_proc

logger = logging.getLogger(__name__)

OPTIONAL_FILES = ("memory.memsw.limit_in_bytes", "memory.swap.max")  # only with swap accounting
MB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What to enforce; None means unlimited."""

    memory_mb: int | None = None
    pids: int | None = None
    cpus: float | None = None
    cpu_time_s: float | None = None
    file_size_mb: int | None = None
    open_files: int | None = None
    network: bool | None = None  # False: a new, empty network namespace (needs root)

    @classmethod
    def from_policy(cls, policy: object) -> Limits:
        return cls(**{f: getattr(policy, f, None) for f in cls.__dataclass_fields__})


class Confinement:
    """Limits and teardown for one process tree (one kernel)."""

    def __init__(self, name: str, limits: Limits, *, token: str = "", use_cgroups: bool = True,
                 uid: int | None = None) -> None:
        self.name, self.limits, self.token = name, limits, token
        self.uid = uid  # the tree's own uid, when it is not the server's (RLIMIT_NPROC then counts it alone)
        version, parents = cgroup_layout() if use_cgroups else ("none", {})
        self.version = version
        # The server's pid in the name lets a later server remove what a crashed one left behind.
        self.dirs: dict[str, Path] = {c: p / f"{os.getpid()}-{name}" for c, p in parents.items()}
        self.root_pid: int | None = None
        self.measured_pid: int | None = None  # without cgroups: the interpreter, below any launcher
        self.session_id: int | None = None
        self.network_isolated = False
        self._user_processes = 0
        self._unshare = _libc_unshare() if limits.network is False else None

    @property
    def mechanism(self) -> str:
        base = "rlimit" if self.version == "none" else f"cgroup-{self.version}+rlimit"
        return base + ("+netns" if self.network_isolated else "")

    def _dir(self, ctrl: str) -> Path | None:
        return self.dirs.get("" if self.version == "v2" else ctrl)

    def create(self) -> None:
        """Create the cgroups and write the limits; falls back to rlimits on any failure."""
        if self.version == "none":
            if self.limits.pids and os.geteuid() != 0 and self.uid is None:
                self._user_processes = count_user_processes()
            logger.info("confinement %s: no usable cgroups, rlimits only", self.name)
            return
        lim = self.limits
        sweep_stale()
        try:
            if self.version == "v2":
                parent = self.dirs[""].parent
                parent.mkdir(exist_ok=True)
                write_value(parent.parent / "cgroup.subtree_control", "+memory +pids +cpu")
                if not write_value(parent / "cgroup.subtree_control", "+memory +pids +cpu"):
                    raise OSError("cannot enable controllers below " + str(parent))
            for d in self.dirs.values():
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            logger.warning("cgroups unavailable (%s); confining with rlimits only", exc)
            self.destroy()
            self.version, self.dirs = "none", {}
            return self.create()
        mem = lim.memory_mb * MB if lim.memory_mb else None
        quota = max(1000, int(lim.cpus * 100000)) if lim.cpus else None
        if self.version == "v1":
            self._limit("memory", {"memory.limit_in_bytes": mem, "memory.memsw.limit_in_bytes": mem})
            self._limit("pids", {"pids.max": lim.pids})
            self._limit("cpu", {"cpu.cfs_period_us": 100000 if quota else None, "cpu.cfs_quota_us": quota})
        else:
            self._limit("", {"memory.max": mem, "memory.swap.max": 0 if mem else None, "pids.max": lim.pids,
                             "cpu.max": f"{quota} 100000" if quota else None})
        logger.debug("confinement %s: %s in %s", self.name, self.mechanism, sorted(map(str, self.dirs.values())))

    def _limit(self, ctrl: str, values: dict[str, object]) -> None:
        """Write limits; a v1 controller that refuses one is dropped, so its rlimit fallback applies."""
        d = self._dir(ctrl)
        if d is None:
            return
        for name, value in values.items():
            if value is None or (name in OPTIONAL_FILES and not (d / name).exists()):
                continue
            if not write_value(d / name, str(value)):
                logger.warning("confinement %s: cannot set %s=%s; falling back to rlimits for %s",
                               self.name, name, value, ctrl or "cgroup v2")
                if self.version == "v1":
                    with contextlib.suppress(OSError):
                        self.dirs.pop(ctrl).rmdir()
                return

    def preexec(self) -> None:
        """Runs in the child between fork and exec: join the cgroups, then set rlimits.

        Must stay async-signal-safe in spirit: no logging, no locks, only os-level calls.
        """
        pid = str(os.getpid()).encode()
        for d in self.dirs.values():
            fd = os.open(d / "cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        try:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            os.write(fd, b"500")  # if the host itself runs out of memory, go before the server
            os.close(fd)
        except OSError:
            pass
        if self._unshare is not None:
            self._unshare(CLONE_NEWNET)  # no interface up, not even lo; failure leaves the network
        for which, soft, hard in self.rlimits():
            resource.setrlimit(which, (soft, hard))

    def rlimits(self) -> list[tuple[int, int, int]]:
        """(resource, soft, hard) for each rlimit of the tree, within the caller's hard limits."""
        lim = self.limits
        settings = [(resource.RLIMIT_CORE, 0)]
        if lim.file_size_mb:
            settings.append((resource.RLIMIT_FSIZE, lim.file_size_mb * MB))
        if lim.open_files:
            settings.append((resource.RLIMIT_NOFILE, lim.open_files))
        if lim.cpu_time_s:
            settings.append((resource.RLIMIT_CPU, max(1, int(lim.cpu_time_s + 0.999))))
        if lim.memory_mb and self._dir("memory") is None:
            # RLIMIT_DATA (not RLIMIT_AS): counts only writable private memory, so the address
            # space that threaded libraries reserve does not count against it.
            settings.append((resource.RLIMIT_DATA, lim.memory_mb * MB))
        if lim.pids and self._dir("pids") is None and (os.geteuid() != 0 or self.uid is not None):
            # Per-uid count (root ignores it): leave room for the user's other processes.
            settings.append((resource.RLIMIT_NPROC, lim.pids + self._user_processes))
        out = []
        for which, value in settings:
            # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later.
            soft, hard = value, value + 1 if which == resource.RLIMIT_CPU else value
            _, old_hard = resource.getrlimit(which)
            if old_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, old_hard), min(hard, old_hard)
            out.append((which, soft, hard))
        return out

    def attach(self, pid: int) -> None:
        """Record the tree's root process (the caller's child) for the rlimit-only teardown."""
        self.root_pid = pid
        try:
            self.session_id = os.getsid(pid)
            self.network_isolated = os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        except OSError:
            self.session_id = None
        if self.limits.network is False and not self.network_isolated:
            logger.warning("confinement %s: could not isolate the network (not root?)", self.name)

    def pids(self) -> set[int]:
        """Every live process of the tree."""
        if self.dirs:
            found: set[int] = set()
            for d in self.dirs.values():
                try:
                    found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
                except OSError:
                    pass
            return found
        return scan_proc(self.session_id, self.token.encode() if self.token else b"")

    def kill_all(self, timeout_s: float = 3.0) -> bool:
        """SIGKILL every process of the tree and wait until it is empty. Blocking (ms)."""
        deadline = time.monotonic() + timeout_s
        v2 = self._dir("") if self.version == "v2" else None
        if v2 is not None and (v2 / "cgroup.kill").exists():
            write_value(v2 / "cgroup.kill", "1")
        freezer = self._dir("freezer") if self.version == "v1" else None
        frozen = freezer is not None and write_value(freezer / "freezer.state", "FROZEN")
        pause = 0.0005  # SIGKILLed processes are gone within a millisecond or so: look again soon
        while True:
            pids = self.pids()
            if self.root_pid is not None and alive(self.root_pid):
                pids.add(self.root_pid)
            pids.discard(os.getpid())
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if frozen:
                write_value(freezer / "freezer.state", "THAWED")  # type: ignore[operator]
                frozen = False
            time.sleep(pause)
            pause = min(2 * pause, 0.005)
        if frozen:
            write_value(freezer / "freezer.state", "THAWED")  # type: ignore[operator]
        if pids:
            logger.warning("confinement %s: %d processes survived SIGKILL", self.name, len(pids))
        return not pids

    # Measurements: the cgroup's counters (whole tree, dead children included); without cgroups,
    # the root process's own figures from /proc (cheap enough to read on every step).

    def memory_bytes(self) -> int | None:
        if (d := self._dir("memory")) is not None:
            return read_int(d / ("memory.usage_in_bytes" if self.version == "v1" else "memory.current"))
        return self._proc_status("VmRSS:")

    def reset_peak(self) -> None:
        if (d := self._dir("memory")) is not None:
            write_value(d / ("memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"), "0")
        elif pid := self.measured_pid or self.root_pid:
            write_value(Path(f"/proc/{pid}/clear_refs"), "5")  # resets VmHWM

    def peak_memory_bytes(self) -> int | None:
        if (d := self._dir("memory")) is not None:
            return read_int(d / ("memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"))
        return self._proc_status("VmHWM:")

    def cpu_time_s(self) -> float | None:
        if self.version == "v1" and (d := self._dir("cpuacct")) is not None:
            ns = read_int(d / "cpuacct.usage")
            return None if ns is None else ns / 1e9
        if self.version == "v2":
            us = read_int(self.dirs[""] / "cpu.stat", "usage_usec")
            return None if us is None else us / 1e6
        try:  # utime + stime + cutime + cstime of the root (reaped children included)
            with open(f"/proc/{self.measured_pid or self.root_pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def _proc_status(self, key: str) -> int | None:
        pid = self.measured_pid or self.root_pid
        kib = read_int(Path(f"/proc/{pid}/status"), key) if pid else None
        return None if kib is None else kib * 1024

    def oom_kills(self) -> int | None:
        """How many processes the memory limit killed so far (None: unknown here)."""
        d = self._dir("memory")
        if d is None:
            return None
        if self.version == "v1":
            return read_int(d / "memory.oom_control", "oom_kill")
        return read_int(d / "memory.events", "oom_kill")

    def destroy(self) -> None:
        """Kill everything and remove the cgroups. Idempotent. Blocking (ms)."""
        self.kill_all()
        for d in self.dirs.values():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
            else:
                logger.warning("could not remove cgroup %s", d)


CLONE_NEWNET = 0x40000000


@lru_cache(maxsize=1)
def _libc_unshare() -> Callable[[int], int] | None:
    """libc's unshare(2), loaded in the parent (never dlopen between fork and exec)."""
    try:
        return ctypes.CDLL(None, use_errno=True).unshare  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_swept = False


def sweep_stale() -> None:
    """Once per process: kill and remove cgroups whose server died without closing its kernels."""
    global _swept
    if _swept:
        return
    _swept = True
    for name in remove_cgroups(lambda owner: not os.path.exists(f"/proc/{owner}")):
        logger.warning("removed cgroup %s left by a server that is gone", name)


def remove_cgroups(owned: Callable[[str], bool]) -> list[str]:
    """Kill every process in, then remove, the kernel cgroups `<pid>-*` whose server pid `owned`
    accepts (by the startup sweep and by the reaper); their names."""
    version, parents = cgroup_layout()
    found: dict[str, dict[str, Path]] = {}
    for ctrl, parent in parents.items():
        for d in parent.glob("*-*") if parent.is_dir() else []:
            owner = d.name.split("-", 1)[0]
            if owner.isdigit() and owned(owner):
                found.setdefault(d.name, {})[ctrl] = d
    for name, dirs in found.items():
        leftover = Confinement(name, Limits(), use_cgroups=False)
        leftover.version, leftover.dirs = version, dirs
        leftover.destroy()
    return list(found)
