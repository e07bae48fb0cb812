"""A closed episode's sandbox made fit for the next episode, or refused: the supervisor's side of
a `recycle` request (Docker).

The rule is conservative: a sandbox is recycled only when its episode left nothing behind but its
worker's namespace. So what the episode could have left is looked for first, in this order:
while its processes still run, the zygote killed, stopped or replaced, an OOM kill, the worker's
environment; with everything stopped (nothing forks in between), any process but the worker;
once everything but the supervisor and the zygote is killed (so that nothing can change them
after the look), the zygote's and the supervisor's limits, priority and CPUs, any file in a
scratch folder, any System V IPC object, a scratch folder's changed mode or extended attributes.
A single finding
refuses the sandbox, and the server removes the container: nothing is wiped, since a sandbox is
recycled only when there is nothing to wipe. Then a fresh worker is forked from the zygote (which
never held anything of an episode) and checked in turn: only it, the zygote and the supervisor
alive, the container's environment, an empty namespace, nothing importable from a writable place
but the (empty) workspace.

Findings are fixed words (`FINDINGS`), never text the episode chose (a file name, a variable): they
travel to the server and its log. Stdlib only; it reaches the container in the runner's bundle.
"""

from __future__ import annotations

import os
import signal
import time

from sandbox_env.inside.bounded import BoundedOutput
from sandbox_env.inside.procs import stat_field
from sandbox_env.inside.slate import SCRATCH_DIRS, SYSV_IPC, WORKSPACE, live_pids, process_state

TYPE_CHECKING = False  # typing costs milliseconds at start; mypy reads this as True
if TYPE_CHECKING:
    from typing import Any

    from sandbox_env.inside.runner import Supervisor

ANSWER_S = 2.0  # an idle worker answers in milliseconds; one that does not is a finding
# Every word a report may hold; the server refuses a report with any other.
FINDINGS = frozenset({
    "zygote", "limits", "oom", "worker", "environment", "process",
    *(f"file:{top}" for top in SCRATCH_DIRS), *(f"folder:{top}" for top in SCRATCH_DIRS),
    *(f"ipc:{kind}" for kind, _ in SYSV_IPC), "zombie", "network",
    "fresh:worker", "fresh:process", "fresh:environment", "fresh:namespace", "fresh:module_path",
})


def folder_state(top: str) -> tuple[int, int, int, tuple[str, ...] | None] | None:
    """What episode code may change on a scratch folder itself, not below it: its mode, owner,
    group and extended attributes (a few bytes for the next episode to find)."""
    try:
        st = os.stat(top, follow_symlinks=False)
    except OSError:
        return None
    try:
        names: tuple[str, ...] | None = tuple(sorted(os.listxattr(top, follow_symlinks=False)))
    except OSError:  # a file system without them
        names = None
    return st.st_mode, st.st_uid, st.st_gid, names


def folder_states() -> dict[str, Any]:
    return {top: folder_state(top) for top in SCRATCH_DIRS}


def recycle(sup: Supervisor) -> dict[str, Any]:
    """Look for what the episode left; if nothing, start and check a fresh worker. The reply's
    `findings` are empty exactly when the sandbox is fit for another episode."""
    findings = while_running(sup)
    if not findings:
        findings = stopped_processes(sup)
        sup.kill_everything()
    if not findings:
        findings = left_behind(sup) or reset_times()
    if not findings:
        sup.cpu_used = 0.0  # the CPU budget is per episode: the next worker's limit starts from it
        findings = fresh_worker(sup)
    if not findings:
        sup.oom_seen = sup.oom_kills()
    return {"clean": not findings, "findings": sorted(set(findings))}


def while_running(sup: Supervisor) -> list[str]:
    """The zygote killed, replaced or stopped (looked at before this recycle stops and resumes
    it); an OOM kill; the worker's environment changed (it says so itself: a lie can only hide a
    change that dies with it)."""
    zygote = sup.zygote
    if not zygote.pid or zygote.pid != zygote.first or stat_field(zygote.pid, 0) not in ("S", "R", "D"):
        return ["zygote"]
    if (sup.oom_kills() or 0) > (sup.oom_seen or 0):
        return ["oom"]
    if not sup.worker or sup.reap() is not None:
        return []  # no worker (a program ran last, or it exited): no environment left to look at
    reply = ask(sup, "slate")
    if reply is None:
        return ["worker"]
    return [] if reply.get("environ") == dict(os.environ) else ["environment"]


def stopped_processes(sup: Supervisor) -> list[str]:
    """Any process but the supervisor, the zygote and the worker: seen with everything stopped, so
    that nothing forks between the listing and the look."""
    os.kill(-1, signal.SIGSTOP)
    os.kill(sup.zygote.pid, signal.SIGCONT)
    expected = {1, os.getpid(), sup.zygote.pid, sup.worker}
    return ["process"] if set(live_pids()) - expected else []


def left_behind(sup: Supervisor) -> list[str]:
    """With nothing of the episode alive: the zygote or the supervisor with other limits,
    priority, CPUs or scheduling than the supervisor had at start (the next worker is forked from
    the zygote), files, IPC objects, changed scratch folders."""
    sup.reap_orphans()  # the worker's children it did not wait for: zombies of ours, not leftovers
    found = [] if process_state(sup.zygote.pid) == sup.baseline else ["zygote"]
    found += [] if process_state(os.getpid()) == sup.baseline else ["limits"]
    # zombies too: one the zygote does not reap (a program's CLONE_PARENT child) holds a pid for good
    found += ["zombie"] if set(all_pids()) - {1, os.getpid(), sup.zygote.pid} else []
    found += ["network"] if sockets_left(sup.unix_sockets) else []
    found += [f"file:{top}" for top in SCRATCH_DIRS if listing(top)]
    found += [f"folder:{top}" for top in SCRATCH_DIRS if folder_state(top) != sup.folders.get(top)]
    for kind, _ in SYSV_IPC:
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                if f.read().count("\n") > 1:  # a header line, then one line per object
                    found.append(f"ipc:{kind}")
        except OSError:
            continue
    return found


NET_TABLES = ("tcp", "tcp6", "udp", "udp6", "raw", "raw6")


def sockets_left(unix_at_start: set[str]) -> bool:
    """Any inet socket in the container's network namespace with nothing of the episode alive
    (TIME_WAIT lasts a minute, keeps ports taken, and its ports carry data), or any unix socket
    but the supervisor's own: sockets sent into their own queue (SCM_RIGHTS, a cycle nothing
    holds) outlive every process, with their names and whatever files they carry."""
    if not inet_counted():
        return bool(unix_sockets() - unix_at_start)
    for table in NET_TABLES:  # the tables are exact, but reading them walks the host's: milliseconds
        try:
            with open(f"/proc/net/{table}") as f:
                if f.read().count("\n") > 1:  # a header line, then one line per socket
                    return True
        except FileNotFoundError:
            continue
        except OSError:
            return True
    return bool(unix_sockets() - unix_at_start)


def inet_counted() -> bool:
    """Whether /proc/net/sockstat{,6} count any inet socket in use or in TIME_WAIT (per network
    namespace on current kernels, host-wide on old ones: then the tables decide)."""
    try:
        for name in ("sockstat", "sockstat6"):
            with open(f"/proc/net/{name}") as f:
                for line in f.read().splitlines():
                    kind, _, fields = line.partition(":")
                    values = fields.split()
                    counts = dict(zip(values[::2], values[1::2]))
                    if kind != "sockets" and (counts.get("inuse", "0") != "0" or counts.get("tw", "0") != "0"):
                        return True
    except OSError:
        return True
    return False


def unix_sockets() -> set[str]:
    """The inodes of the unix sockets in the container's network namespace ("?": unreadable)."""
    try:
        with open("/proc/net/unix") as f:
            return {fields[6] for fields in (line.split() for line in f.read().splitlines()[1:]) if len(fields) > 6}
    except OSError:
        return {"?"}


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def reset_times() -> list[str]:
    """The scratch folders' timestamps, which episode code sets at will (64 bits each): the
    workspace's to 0 (the supervisor owns it), the others' to now (all their write permission
    allows); a folder whose times cannot be reset is a finding."""
    found = []
    for top in SCRATCH_DIRS:
        try:
            os.utime(top, ns=(0, 0)) if top == WORKSPACE else os.utime(top)
        except FileNotFoundError:
            continue
        except OSError:
            found.append(f"folder:{top}")
    return found


def listing(top: str) -> list[str]:
    try:
        return os.listdir(top)
    except FileNotFoundError:
        return []
    except OSError:
        return ["?"]  # unreadable: not known to be empty


def fresh_worker(sup: Supervisor) -> list[str]:
    """Fork the next episode's worker from the zygote and check what it starts with."""
    if not sup.spawn(from_zygote=True):
        return ["fresh:worker"]
    reply = ask(sup, "slate")
    if reply is None:
        return ["fresh:worker"]
    found = []
    if set(live_pids()) != {1, os.getpid(), sup.zygote.pid, sup.worker}:
        found.append("fresh:process")
    if reply.get("environ") != dict(os.environ):
        found.append("fresh:environment")
    if reply.get("variables") != {}:
        found.append("fresh:namespace")
    if not importable_only_read_only(reply.get("path")):
        found.append("fresh:module_path")
    return found


def importable_only_read_only(path: Any) -> bool:
    """Every folder on the worker's `sys.path` is on a read-only file system (no module on disk
    can have changed), but the workspace, its working directory, found empty just before."""
    if type(path) is not list or not all(type(entry) is str for entry in path):
        return False
    return all(entry in ("", WORKSPACE) or read_only(entry) for entry in path)


def read_only(path: str) -> bool:
    """Whether `path`, or the nearest folder above it that exists, is on a read-only mount."""
    while True:
        try:
            return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        except FileNotFoundError:
            if path in ("", "/"):
                return False
            path = os.path.dirname(path.rstrip("/")) or "/"
        except OSError:
            return False


def ask(sup: Supervisor, op: str) -> dict[str, Any] | None:
    """The worker's answer to `op`, or None when it does not give one in time. Whatever it prints
    meanwhile is dropped: none of it may reach the next episode."""
    sup.ask({"op": op})
    reply, _ = sup.wait(time.monotonic() + ANSWER_S, BoundedOutput(sup.keep), BoundedOutput(sup.keep))
    return reply
