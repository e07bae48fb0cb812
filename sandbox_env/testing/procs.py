"""Host-side process lookups for the checks (Linux /proc, stdlib only): a process the code starts
carries a random token in its command line, and the checks look for that token from outside."""

from __future__ import annotations

import asyncio
import os
import time
import uuid


def token() -> str:
    return f"sbxtok{uuid.uuid4().hex}"


def sleeper(tok: str) -> str:
    """Python code, one statement (it needs `os`), that turns the process running it into a long
    sleep carrying `tok` in its command line: a process the checks then look for from outside."""
    return f"os.execv('/bin/sleep', [{tok!r}, '300'])"


def processes_with(needle: str) -> list[int]:
    """Pids of live processes (zombies do not count) whose command line contains `needle`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone meanwhile
            continue
        if needle in cmdline and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


async def wait_gone(needle: str, timeout_s: float = 5.0) -> list[int]:
    """Processes carrying `needle` still alive after `timeout_s` (reparenting and reaping take a moment)."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_with(needle)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


async def wait_present(needle: str, timeout_s: float = 5.0) -> list[int]:
    """Processes carrying `needle`, waiting for them to appear (an exec takes a moment)."""
    deadline = time.monotonic() + timeout_s
    while not (found := processes_with(needle)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return found


def own_rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
