"""Processes as /proc shows them: how a confinement without cgroups finds and counts its tree."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def scan_proc(session_id: int | None, token: bytes) -> set[int]:
    """Processes in the session or carrying the token in their environment (no-cgroup fallback)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue
            if session_id is not None and int(fields[4]) == session_id:
                found.add(int(entry))
                continue
            if token:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if token in f.read():
                        found.add(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def count_user_processes() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                count += 1
        except OSError:
            pass
    return count
