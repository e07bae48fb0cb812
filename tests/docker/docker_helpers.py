"""Helpers shared by the Docker test modules: a small policy and container lookups by label."""

from __future__ import annotations

from typing import Any

from sandbox_env.policy import Policy


def sandbox_policy(**overrides: Any) -> Policy:
    """Small limits so that every limit test is quick."""
    fields: dict[str, Any] = {
        "name": "test", "timeout_s": 3, "memory_mb": 256, "pids": 32, "cpus": 1.0, "open_files": 128,
        "file_size_mb": 16, "output_bytes": 16_384, "output_limit_bytes": 4_000_000, "workspace_mb": 64,
        "tmp_mb": 16,
    }
    fields.update(overrides)
    return Policy(**fields)


def episode_containers(client: Any, kernel_id: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"sandbox-env.episode={kernel_id}"})


# Source defining `memory_counts(reversed_needles)`: how often each needle occurs in this process's
# readable memory. Needles are given reversed, so the probe's own source holds none of them; the
# needle objects it builds count once for every needle alike. Compare a needle against a control
# that occurs nowhere else (equal counts: absent) and one that surely is present (higher count).
MEMORY_PROBE = '''
def memory_counts(reversed_needles):
    needles = {key: value[::-1].encode() for key, value in reversed_needles.items()}
    counts = dict.fromkeys(needles, 0)
    overlap = max(map(len, needles.values()))
    buf = bytearray(1 << 20)  # one buffer, reused: the scan makes no copies of what it reads
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f.read().splitlines()]
    with open("/proc/self/mem", "rb", 0) as mem:
        for fields in regions:
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            at = low
            while at < high:
                try:
                    mem.seek(at)
                    got = mem.readinto(memoryview(buf)[:min(len(buf), high - at)])
                except (OSError, OverflowError, ValueError):
                    break
                if not got:
                    break
                last = at + got >= high
                for key, needle in needles.items():  # a match starting in the overlap: next chunk's
                    counts[key] += buf.count(needle, 0, got if last else got - overlap + len(needle) - 1)
                if last:
                    break
                at += got - overlap
    return counts
'''


def reversed_needles(**needles: str) -> dict[str, str]:
    return {key: value[::-1] for key, value in needles.items()}
