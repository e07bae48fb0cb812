"""The kernels' folders on the host (`sandbox-env-<server pid>-*`): emptied, replaced, removed, and
swept when a server died without closing its kernels. Nothing here follows the code's symlinks."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sandbox_env.inside.slate import empty

logger = logging.getLogger(__name__)

swept_roots: set[str] = set()


def sweep_workdirs(parent: str | None) -> None:
    """Once per directory: delete what servers that died without closing their kernels left there.

    Directories carry their server's pid (`sandbox-env-<pid>-*`); a kernel dies with its server
    (bwrap's --die-with-parent; ipykernel watches its parent when unisolated), its cgroups go in
    `limits.sweep_stale`.
    """
    base = Path(parent or tempfile.gettempdir())
    if str(base) in swept_roots:
        return
    swept_roots.add(str(base))
    for path in remove_workdirs(parent, lambda owner: not os.path.exists(f"/proc/{owner}")):
        logger.warning("removed %s, left by a server that is gone", path)


def remove_workdirs(parent: str | None, owned: Callable[[str], bool]) -> list[Path]:
    """Remove the kernels' work directories `sandbox-env-<pid>-*` under `parent` (default: the
    temp dir) whose server pid `owned` accepts (by the startup sweep and by the reaper)."""
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob("sandbox-env-*-*"):
        owner = path.name.split("-")[2]
        if owner.isdigit() and owned(owner) and path.is_dir() and not path.is_symlink():
            remove_dir(path)
            removed.append(path)
    return removed


def empty_dirs(*folders: Path) -> None:
    """Delete what is inside `folders`, however deep and never following symlinks; the folders stay
    (made anew when the code replaced one). Never raises for what the code did to its files."""
    for folder in folders:
        try:
            fresh_dir(folder)
            empty(str(folder))
        except OSError as exc:
            logger.warning("could not empty %s: %r", folder, exc)


def fresh_dir(path: Path) -> None:
    """`path` as a real folder: whatever the code put in its place (a symlink, a file) goes."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    path.mkdir(mode=0o700, exist_ok=True)


def remove_dir(path: Path) -> None:
    """Delete a folder and everything in it (iterative, two fds at most, no symlink followed)."""
    try:
        empty(str(path))
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove %s: %r", path, exc)
