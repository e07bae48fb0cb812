"""A clean slate inside a Docker sandbox: every process but the supervisor's own killed, the
scratch folders and IPC objects emptied, and a check of what same-uid code could have changed.

All of it runs in the supervisor (PID 1) while nothing else of the episode is alive, so no
process can race it; still, nothing here follows a symlink, and what cannot be cleaned is
reported, never ignored: a sandbox that is not clean is replaced.
"""

from __future__ import annotations

import os
import signal
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

WORKSPACE = "/workspace"
SCRATCH_DIRS = (WORKSPACE, "/tmp", "/dev/shm", "/dev/mqueue")
SYSV_IPC = (("shm", "shmctl"), ("sem", "semctl"), ("msg", "msgctl"))  # /proc/sysvipc/<kind>, remover
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_STEPS = 1_000_000  # entries removed or folders entered: a bound, whatever was planted


def wipe(paths: tuple[str, ...] = SCRATCH_DIRS) -> list[str]:
    """Empty each folder of `paths` (the folders stay); the ones that could not be emptied."""
    left = []
    for top in paths:
        try:
            empty(top)
            if os.listdir(top):
                left.append(top)
        except FileNotFoundError:
            continue
        except BaseException:  # noqa: BLE001 - whatever was planted, the answer is "not clean"
            left.append(top)
    return left


def empty(top: str) -> None:
    """Delete everything below `top` holding two folder fds at most, however deep the tree (one fd
    per level, as rmtree holds, runs out at RLIMIT_NOFILE): go down into the first folder that is
    not empty, come back up through ".." once it is."""
    fd, depth = os.open(top, DIRECTORY), 0
    try:
        for _ in range(MAX_STEPS):
            below = clear_files(fd)
            if below is not None:
                try:
                    os.chmod(below, 0o700, dir_fd=fd, follow_symlinks=False)
                except (OSError, NotImplementedError):
                    pass
                inner = os.open(below, DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd, depth = inner, depth + 1
            elif depth:
                outer = os.open("..", DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd, depth = outer, depth - 1
            else:
                return
    finally:
        os.close(fd)


def clear_files(fd: int) -> str | None:
    """Remove the files and empty folders in the folder `fd`; the name of a folder left to enter."""
    try:
        os.fchmod(fd, 0o700)
    except OSError:
        pass  # a root-owned top (/tmp, /dev/shm): its entries are still ours to remove
    for name in os.listdir(fd):
        mode = 0
        try:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                os.rmdir(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            continue
        except OSError:
            if stat.S_ISDIR(mode):
                return name  # not empty (or not ours to remove): go in
            raise
    return None


def wipe_ipc() -> None:
    """Remove every System V shared memory segment, semaphore set and message queue (the
    container has its own IPC namespace): what one program leaves there, the next could read."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return
    for kind, remover in SYSV_IPC:
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                ids = [int(line.split()[1]) for line in f.read().splitlines()[1:] if line.strip()]
        except (OSError, ValueError, IndexError):
            continue
        for ipc_id in ids:
            if kind == "sem":
                libc.semctl(ipc_id, 0, 0)  # IPC_RMID
            else:
                getattr(libc, remover)(ipc_id, 0, None)


IOPRIO_WHO_PROCESS = 1
IOPRIO_GET = {"x86_64": 252, "aarch64": 31}  # the syscall's number: Python has no wrapper


def ioprio(pid: int) -> int | None:
    try:
        import ctypes

        number = IOPRIO_GET.get(os.uname().machine)
        return None if number is None else ctypes.CDLL(None, use_errno=True).syscall(number, IOPRIO_WHO_PROCESS, pid)
    except (ImportError, OSError, AttributeError):
        return None


SCHED_GETATTR = {"x86_64": 315, "aarch64": 275}
SCHED_ATTR_SIZE = 56  # struct sched_attr with the utilization clamps


def sched_attr(pid: int) -> bytes | None:
    """The whole struct sched_attr: beside the policy and nice value, the time slice
    (sched_runtime, EEVDF) and the clamps, which sched_setattr changes and forks inherit."""
    try:
        import ctypes

        number = SCHED_GETATTR.get(os.uname().machine)
        if number is None:
            return None
        buffer = ctypes.create_string_buffer(SCHED_ATTR_SIZE)
        if ctypes.CDLL(None, use_errno=True).syscall(number, pid, buffer, SCHED_ATTR_SIZE, 0) != 0:
            return None
        return buffer.raw[4:]  # without the size field the kernel fills in
    except (ImportError, OSError, AttributeError):
        return None


def process_state(pid: int) -> tuple[Any, ...] | None:
    """What same-uid code can change in another process and its forks inherit, but cannot always
    undo (a lowered hard limit, a higher nice value, SCHED_IDLE, an idle I/O class, a time slice):
    the rlimits, the nice value, the CPUs, the scheduling policy, priority and attributes, the I/O
    priority."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            limits = f.read()
        return (limits, os.getpriority(os.PRIO_PROCESS, pid), sorted(os.sched_getaffinity(pid)),
                os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority, ioprio(pid),
                sched_attr(pid))
    except OSError:
        return None


def live_pids() -> list[int]:
    """Pids with a thread still running. A process whose main thread has exited shows "Z" in its
    own stat while its other threads run on, so every thread is looked at."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and running(entry)]


def running(pid: str) -> bool:
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                    return True
        except (OSError, IndexError):
            continue
    return False


def others_alive(spare: int = 0) -> bool:
    return any(pid not in (1, os.getpid(), spare) for pid in live_pids())


def kill_all_but(spare: int) -> None:
    """SIGKILL every process but this one (PID 1) and `spare`, whatever state it shows. Everything
    is stopped at once first, so nothing forks between the listing and the kill; `spare` is then
    resumed."""
    os.kill(-1, signal.SIGSTOP)
    os.kill(spare, signal.SIGCONT)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (1, os.getpid(), spare):
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def count_processes() -> int:
    return len(live_pids())
