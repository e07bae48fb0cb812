"""Process-level helpers shared by the sandbox's programs: the dumpable switch, a field of
/proc/<pid>/stat, exit statuses, the round of a pipe exchange with a child under a deadline."""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # typing costs milliseconds at start; mypy reads this as True
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
CHUNK = 1 << 16  # bytes written to or read from a pipe at a time


def set_dumpable(flag: bool) -> bool:
    """PR_SET_DUMPABLE; True once the flag is in force. A non-dumpable process cannot be ptraced,
    and its memory, fds and environment under /proc are closed to other processes of its uid
    (every process of a sandbox has the same uid). Callers that guard secrets refuse to go on
    when this returns False."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(PR_SET_DUMPABLE, int(flag), 0, 0, 0)
        return bool(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)) == flag
    except Exception:  # noqa: BLE001 - no ctypes, no libc: the caller decides
        return False


def stat_field(pid: int, index: int) -> str:
    """Field `index` of /proc/<pid>/stat counted after the command name (0: the state letter,
    19: the start time); "" when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[index].decode()
    except (OSError, IndexError):
        return ""


def exit_status(value: object, *, announce: bool = True) -> int:
    """The status `python3 -c` exits with on `SystemExit(value)`; a message is printed (when
    `announce`) and gives 1."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    if announce:
        import sys

        try:
            print(value, file=sys.stderr)
        except BaseException:  # noqa: BLE001, S110 - the code may have replaced or closed stderr
            pass
    return 1


def exchange(pending: dict[int, bytes], readers: Iterable[int], deadline: float,
             close: Callable[[int], object]) -> list[int] | None:
    """One round of feeding a child's input pipes and reading its output pipes (all non-blocking):
    wait, until `deadline` (`time.monotonic()`), for one of `readers` to be readable or one fd of
    `pending` to be writable; write each writable fd the next CHUNK of its bytes. An fd done with,
    all its bytes written or its reader gone (a write failing other than EAGAIN), leaves `pending`
    and is given to `close`. Returns the readable fds, for the caller to read; None once the
    deadline has passed (then nothing is waited for or written)."""
    import select  # here: the worker, which bundles this module too, never needs it

    left = deadline - time.monotonic()
    if left <= 0:
        return None
    readable, writable, _ = select.select(list(readers), list(pending), [], left)
    for fd in writable:
        try:
            pending[fd] = pending[fd][os.write(fd, pending[fd][:CHUNK]):]
        except BlockingIOError:
            continue
        except OSError:
            pending[fd] = b""
        if not pending[fd]:
            del pending[fd]
            close(fd)
    return readable
