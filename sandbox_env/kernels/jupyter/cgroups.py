"""Where the kernels' cgroups go: this machine's cgroup layout (v1, v2 or none) and the server's
writable place in it, plus the one-value reads and writes of cgroup (and /proc) control files.

Cgroups are created as `sandbox-env/<name>` below the server's own cgroup in each hierarchy, so
whatever limits the server itself runs under still apply to its kernels.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
GROUP_DIR = "sandbox-env"


@lru_cache(maxsize=1)
def cgroup_layout() -> tuple[str, dict[str, Path]]:
    """Detect ('v1', {controller: parent dir}) / ('v2', {'': parent dir}) / ('none', {})."""
    version, parents = _detect_layout()
    if version == "none":
        logger.info("no writable cgroups: kernels are confined with rlimits only")
    else:
        logger.info("kernels are confined with cgroup %s (%s) plus rlimits", version,
                    ", ".join(f"{c or 'unified'}: {p}" for c, p in parents.items()))
    return version, parents


def _detect_layout() -> tuple[str, dict[str, Path]]:
    try:
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                own[c] = path.lstrip("/")
        mounts: dict[str, Path] = {}
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fstype, _, opts = (right.split(" ") + ["", "", ""])[:3]
            point = Path(left.split(" ")[4])
            if fstype == "cgroup2":
                mounts.setdefault("", point)
            elif fstype == "cgroup":
                for opt in opts.split(","):
                    if opt in V1_CONTROLLERS:
                        mounts[opt] = point
    except (OSError, ValueError):
        return "none", {}

    def parent_of(ctrl: str) -> Path | None:
        mount = mounts.get(ctrl)
        if mount is None:
            return None
        base = mount / own.get(ctrl, "")
        base = base if base.is_dir() else mount
        return base / GROUP_DIR if os.access(base, os.W_OK) else None

    if "memory" in mounts:
        dirs = {c: p for c in V1_CONTROLLERS if (p := parent_of(c)) is not None}
        if "memory" in dirs:
            return "v1", dirs
    if "" in mounts:
        root = parent_of("")
        ctrl_file = mounts[""] / own.get("", "") / "cgroup.controllers"
        try:
            available = ctrl_file.read_text().split()
        except OSError:
            available = []
        if root is not None and {"memory", "pids"} <= set(available):
            return "v2", {"": root}
    return "none", {}


def write_value(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
        return True
    except OSError as exc:
        logger.debug("cannot write %s to %s: %s", value, path, exc)
        return False


def read_int(path: Path, key: str | None = None) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    if key is None:
        return int(text.split()[0]) if text.split() else None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == key:
            return int(parts[1])
    return None
