"""Process-level helpers shared by the sandbox's programs: the dumpable switch, exit statuses."""

from __future__ import annotations

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4


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
