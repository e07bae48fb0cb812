"""Host side of the security tests: ship `episode_probe.py` into an episode, name what it reached.

A probe reports processes by fingerprint (`comm@starttime` from /proc/<pid>/stat, the same in
every pid namespace). Here each fingerprint is mapped back to a host process and given a role:
`own` (the attacking episode's sandbox), `canary` (another episode), `grader` (a grading in
progress), `server`, `other-sandbox` (any other sandbox-env kernel or container), `host`.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import json
import os
import re
import socket
import sys
import sysconfig
import threading
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import sandbox_env
from sandbox_env.grading.tasks import Task, parse_task
from sandbox_env.kernels import load_kernel_class
from sandbox_env.kernels.base import Kernel
from sandbox_env.policy import Policy, load_policy

TRUE = ("1", "true", "yes", "on")
BACKENDS = ["jupyter", pytest.param("docker", marks=pytest.mark.docker)]
KernelFactory = Callable[..., Awaitable[Kernel]]
PROBE_SOURCE = Path(__file__).with_name("episode_probe.py").read_text()
SYSCALLS = [line.split('"')[1] for line in PROBE_SOURCE.split("SYSCALLS = {", 1)[1].split("}\n", 1)[0].splitlines()
            if line.strip().startswith('"')]  # the names the probe tries, for parametrization
RESULT_MARK = "@@sbx-security-result@@"
# The machine's own tooling (the shell that runs these sessions): never opened, never written.
MACHINERY = ["/tmp/bash_jobs", "/tmp/bash_tool_"]
if sys.prefix != sys.base_prefix:  # a virtualenv (say, under /tmp): the kernels' read-only Python, tens of thousands of files
    MACHINERY.append(sys.prefix.rstrip("/") + "/")
RUNTIME_SOCKETS = ["/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
                   "/run/docker/containerd/containerd.sock", "/var/run/docker/containerd/containerd.sock"]
RUNTIME_PATHS = ("/run/docker", "/var/run/docker", "/run/containerd", "/var/run/containerd", "/run/docker.sock")
EPISODE_ROOT = re.compile(r"sandbox-env-\d+-[A-Za-z0-9_]+")
REPO = Path(sandbox_env.__file__).resolve().parent.parent


def token(kind: str = "tok") -> str:
    return f"sbx{kind}{uuid.uuid4().hex}"


def reversed_needles(needles: dict[str, str]) -> dict[str, str]:
    """Needles travel reversed: the probe's own text then holds none of them."""
    return {key: value[::-1] for key, value in needles.items() if value}


def security_policy(**overrides: Any) -> Policy:
    """The shipped `default` policy (untrusted code), with room for the probes' reports."""
    fields: dict[str, Any] = {"name": "security", "timeout_s": 60.0, "output_bytes": 4 << 20,
                              "output_limit_bytes": 16 << 20, "memory_mb": 512, "pids": 64}
    fields.update(overrides)
    return load_policy("default").model_copy(update=fields)


def jupyter_unisolated_opt_in() -> bool:
    """Whether jupyter kernels here run with the explicit unisolated opt-in."""
    if os.environ.get("SANDBOX_ENV_JUPYTER_UNISOLATED", "").strip().lower() in TRUE:
        return True
    try:
        from sandbox_env.settings import Settings

        return bool(getattr(Settings(), "jupyter_unisolated", False))
    except Exception:  # noqa: BLE001 - a settings error is not an opt-in
        return False


def require_backend(name: str, request: pytest.FixtureRequest) -> None:
    if name == "docker":
        request.getfixturevalue("require_docker")
    elif jupyter_unisolated_opt_in():
        pytest.skip("jupyter runs with the explicit unisolated opt-in (SANDBOX_ENV_JUPYTER_UNISOLATED): "
                    "it promises no isolation, so these assertions do not apply")


def new_kernel(name: str, policy: Policy | None = None) -> Kernel:
    cls = load_kernel_class(name)
    if name == "docker":
        from sandbox_env.kernels.docker.config import DockerConfig

        return cls(policy or security_policy(), DockerConfig(owner="pytest-security"))
    return cls(policy or security_policy())


# -- shipping probes ----------------------------------------------------------------------------------
def probe_code(function: str, args: dict[str, Any] | None = None) -> str:
    """Source of a step that runs `episode_probe.<function>(args)` and prints its JSON report."""
    call = f"{function}(json.loads({json.dumps(args or {})!r}))"
    return (PROBE_SOURCE + "\nimport base64 as _b64, zlib as _zlib\n"
            f"print({RESULT_MARK!r} + _b64.b64encode(_zlib.compress(json.dumps({call}, default=str).encode())).decode())\n")


def parse_report(stdout: str) -> dict[str, Any] | None:
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            report: dict[str, Any] = json.loads(zlib.decompress(base64.b64decode(line[len(RESULT_MARK):])))
            return report
    return None


async def run_probe(kernel: Any, function: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    result = await kernel.execute(probe_code(function, args), timeout_s=kernel.policy.timeout_s)
    report = parse_report(result.stdout)
    assert report is not None, f"the probe {function} reported nothing: {result.status} {result.stderr[-3000:]}"
    return report


async def step_json(kernel: Any, code: str) -> Any:
    result = await kernel.execute(code + "\nimport json as _j\nprint('@@' + _j.dumps(_out, default=str))\n")
    lines = [line for line in result.stdout.splitlines() if line.startswith("@@")]
    assert lines, f"{result.status}: {result.stderr[-2000:]}"
    return json.loads(lines[-1][2:])


# -- kernels: identity on the host ----------------------------------------------------------------------
def kernel_ident(kernel: Any) -> str:
    """A string found in /proc/<pid>/cgroup of every process of the kernel's sandbox (programs
    it runs included): the jupyter kernel's id, the Docker container's id."""
    ident = kernel.container_id if kernel.name == "docker" else kernel.id
    assert ident, kernel
    return str(ident)


def kernel_root_name(kernel: Any) -> str | None:
    """Name of a jupyter kernel's private directory on the host (its connection file, sockets,
    workdir live below it); None for Docker."""
    root = getattr(kernel, "root", None)
    return None if root is None else Path(root).name.removesuffix(".closing")


def connection_file(kernel: Any) -> tuple[str, str] | None:
    """(path, HMAC key) of a jupyter kernel's connection file, as the server knows them."""
    cur = getattr(kernel, "_cur", None)
    km = getattr(cur, "km", None)
    if km is None:
        return None
    return str(km.connection_file), km.session.key.decode()


def fingerprint(pid: int) -> str | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    comm = data[data.index("(") + 1:data.rindex(")")]
    return f"{comm}@{data[data.rindex(')') + 2:].split()[19]}"


def host_fingerprints() -> dict[str, list[int]]:
    """fingerprint -> host pids (several when processes started in the same clock tick)."""
    table: dict[str, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit() and (fp := fingerprint(int(name))) is not None:
            table[fp].append(int(name))
    return table


def resolve(table: dict[str, list[int]], fp: str, cgroup: str | None = None, inner_pid: int | None = None) -> int | None:
    """The host pid of a process a probe reported: by fingerprint, and among processes that
    started in the same tick (a forked kernel and its parent), the one with the probe's own pid in
    its pid namespace, else the one confined where the probe saw it (a path inside a cgroup
    namespace is the tail of the host's path)."""
    candidates = table.get(fp, [])
    if len(candidates) > 1 and inner_pid is not None:
        nested = [pid for pid in candidates if len(ns_pids(pid)) > 1 and ns_pids(pid)[-1] == inner_pid]
        candidates = nested or candidates
    if len(candidates) > 1 and cgroup:
        exact = [pid for pid in candidates if cgroup_line(pid) == cgroup]
        tail = [pid for pid in candidates if cgroup_line(pid).endswith(cgroup.rstrip("/"))]
        candidates = exact or tail or candidates
    return candidates[0] if candidates else None


def ns_pids(pid: int) -> list[int]:
    """The pid in each pid namespace the process is in, the host's first."""
    try:
        line = next(li for li in Path(f"/proc/{pid}/status").read_text().splitlines() if li.startswith("NSpid:"))
    except (OSError, StopIteration):
        return []
    return [int(x) for x in line.split()[1:]]


def cgroup_text(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def cgroup_line(pid: int | None) -> str:
    """The memory (v1) or unified (v2) line of /proc/<pid>/cgroup: where a process is confined."""
    lines = cgroup_text(pid).splitlines() if pid else []
    picked = [line for line in lines if ":memory:" in line or line.startswith("0::")]
    return (picked or lines or ["?"])[0].split(":", 2)[-1]


def environ_sha256(pid: int) -> str:
    return hashlib.sha256(Path(f"/proc/{pid}/environ").read_bytes()).hexdigest()


def processes_with(needle: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if needle in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE \
                and proc.pid != os.getpid():
            found.append(proc.pid)
    return found


def wait_gone(needle: str, timeout_s: float = 10.0) -> list[int]:
    """Processes carrying `needle` still there after `timeout_s` (a bound, not an assertion)."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_with(needle)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_own_leftovers(needle: str) -> None:
    """Kill, by pid, processes this test started (their command line carries its token)."""
    for pid in processes_with(needle):
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def wait_for_comm(comm: str, timeout_s: float = 60.0) -> int | None:
    """The host pid of the process that renamed itself `comm` (the held grader), once it exists."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] == comm:
                return proc.pid
        time.sleep(0.05)
    return None


# -- roles ---------------------------------------------------------------------------------------------
@dataclass
class Roles:
    """How to name a host process. `idents`: role -> strings found in its /proc/<pid>/cgroup;
    `comms`: role -> a comm the role's process gave itself; `own_cgroup`: the attacker's exact
    /proc/<pid>/cgroup (for episodes whose id the test does not know, behind a server)."""

    server: set[int] = field(default_factory=set)
    idents: dict[str, list[str]] = field(default_factory=dict)
    comms: dict[str, str] = field(default_factory=dict)
    own_cgroup: str | None = None
    roots: dict[str, str] = field(default_factory=dict)  # role -> name of its episode directory

    def of_pid(self, pid: int | None) -> str:
        if pid is None:
            return "gone"
        if pid in self.server:
            return "server"
        text = cgroup_text(pid)
        fp = fingerprint(pid) or "@"
        for role, comm in self.comms.items():
            if fp.rsplit("@", 1)[0] == comm:
                return role
        if self.own_cgroup is not None and text == self.own_cgroup:
            return "own"
        for role, idents in self.idents.items():
            if any(ident in text for ident in idents):
                return role
        return "other-sandbox" if ("sandbox-env" in text or "docker" in text) else "host"

    def of(self, fp: str, table: dict[str, list[int]], cgroup: str | None = None, inner_pid: int | None = None) -> str:
        return self.of_pid(resolve(table, fp, cgroup, inner_pid))

    def of_path(self, path: str) -> str:
        """A path's role: by the episode directory it lies in, the container runtime's, or host."""
        for role, name in self.roots.items():
            if name and name in path:
                return role
        if path.startswith(RUNTIME_PATHS):
            return "server"  # the container runtime: whoever reaches it commands every sandbox
        return "other-sandbox" if EPISODE_ROOT.search(path) else "host"

    def adopt(self, report: dict[str, Any]) -> None:
        """Take the attacker's own sandbox from its report: its process's cgroup, its directory."""
        pid = resolve(host_fingerprints(), report["self"]["fingerprint"], report["self"].get("cgroup"),
                      report["self"].get("pid"))
        if pid is not None and self.own_cgroup is None:
            self.own_cgroup = cgroup_text(pid)
        match = EPISODE_ROOT.search(report["self"]["cwd"])
        if match and "own" not in self.roots:
            self.roots["own"] = match.group()


def shared_with_host(entry: dict[str, Any]) -> bool:
    """Whether a path the sandbox reached is the host's own file (same device and inode), not a
    private mount that happens to have the same name."""
    try:
        st = os.lstat(entry["path"])
    except (OSError, KeyError):
        return False
    return "dev" not in entry or (st.st_dev, st.st_ino) == (entry["dev"], entry["ino"])


ACCESS_KINDS = ("fd_list", "fds_opened", "mem", "environ_sha256", "cwd", "root", "signal0")


def sweep_findings(report: dict[str, Any], roles: Roles, *, server_environ: str | None = None,
                   needle_roles: dict[str, str] | None = None) -> dict[str, list[str]]:
    """role -> what of it the sweep reached (empty lists are dropped)."""
    table = host_fingerprints()
    found: dict[str, list[str]] = defaultdict(list)
    for proc in report["processes"]:
        role = roles.of(proc["fingerprint"], table, proc.get("cgroup"))
        kinds = [k for k in ACCESS_KINDS if k in proc]
        if server_environ is not None and proc.get("environ_sha256") == server_environ:
            found["server"].append(f"pid {proc['pid']} ({proc['comm']}): environ is the server's")
        if role != "own" and kinds:
            host_pid = resolve(table, proc["fingerprint"], proc.get("cgroup"))
            where = f"host pid {host_pid}, cgroup {cgroup_line(host_pid)}" if host_pid else "gone"
            found[role].append(f"pid {proc['pid']} ({proc['comm']}; {where}): {kinds} {proc.get('fd_examples', [])[:4]}")
    for ns in report["netns"]:
        if ns.get("setns") == "ok":
            found[roles.of(ns["fingerprint"], table, ns.get("cgroup"))].append(
                f"setns() into the network namespace of {ns['fingerprint']} (pid {ns['pid']}): {ns.get('ports')}")
    for port, outcome in report["ports"].items():
        if outcome.startswith("connected"):
            found["server"].append(f"127.0.0.1:{port} from the episode's own namespace: {outcome}")
    for hit in report["secrets"]:
        role = (needle_roles or {}).get(hit["needle"], hit["needle"].split(":")[0])
        found[role].append(f"secret {hit['needle']} in {hit['where']}")
    files = report["files"]
    for entry in [*files["write"], *files["dirs_writable"]]:
        role = roles.of_path(entry["path"])  # named by an episode's directory: wherever it is mounted
        if role not in ("own", "host") or (role == "host" and shared_with_host(entry)):
            found[role].append(f"writable: {entry['path']}")
    for entry in [*files["sockets"], *report["named_sockets"]]:
        if entry["connect"] == "connected":
            path = entry["path"]
            role = "server" if path in RUNTIME_SOCKETS else roles.of_path(path)
            if role != "own":
                found[role].append(f"connect(): {path}")
    if files["truncated"]:
        found["harness"].append(f"the file walk stopped after {files['entries']} entries")
    return {role: items for role, items in found.items() if items}


def describe(findings: dict[str, list[str]], roles_wanted: tuple[str, ...], limit: int = 25) -> str:
    lines = []
    for role in roles_wanted:
        items = findings.get(role, [])
        lines.append(f"{role}: {len(items)} reached")
        lines.extend(f"    {item}" for item in items[:limit])
        if len(items) > limit:
            lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)


# -- the server's stand-in and a held grading -------------------------------------------------------
class LoopbackListener:
    """A TCP listener on the host's loopback standing for the server's API: counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"listener-{self.port}")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def loopback_listener() -> Iterator[LoopbackListener]:
    listener = LoopbackListener()
    try:
        yield listener
    finally:
        listener.close()


def holding_task(marker: str, comm: str, hold_s: float, task_id: str = "security/hold") -> dict[str, Any]:
    """A task whose hidden check (trusted, it runs in the grader) renames the grader process to
    `comm`, so the host can see it, and holds the grading for `hold_s` with the hidden tests,
    `marker` included, in the grader's hands."""
    check = (f"HIDDEN = {marker!r}\n"
             "def check(candidate):\n"
             "    import ctypes, time\n"
             f"    if ctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0) != 0:\n"
             f"        open('/proc/self/comm', 'w').write({comm!r})\n"
             f"    end = time.monotonic() + {hold_s}\n"
             "    while time.monotonic() < end:\n"
             "        time.sleep(0.05)\n"
             "    assert candidate(3) == 9\n")
    return {"id": task_id, "tests": {"kind": "function", "check": check, "entry_point": "square"},
            "timeout_s": hold_s + 30}


def parse(task: dict[str, Any]) -> Task:
    return parse_task(task)


GOOD_SQUARE = "def square(x):\n    return x * x\n"
WRONG_SQUARE = "def square(x):\n    return x + 1\n"


def protected_paths() -> list[str]:
    """What no episode may write: the repository, its source, the installed grader, the policies,
    the interpreter and its site-packages."""
    purelib = sysconfig.get_paths()["purelib"]
    paths = [REPO, REPO / "sandbox_env", REPO / "sandbox_env" / "inside", REPO / "sandbox_env" / "inside" / "grader.py",
             REPO / "sandbox_env" / "grading.py", REPO / "policies", REPO / "policies" / "default.toml",
             REPO / "pyproject.toml", Path(purelib), Path(os.path.realpath(sys.executable)),
             Path(os.path.realpath(sys.executable)).parent]
    return [str(p) for p in paths]


def connection_files_below(root_pid: int) -> list[str]:
    """Connection files of every kernel started below `root_pid` (the `-f FILE` of its command
    line, whatever wraps it, or in the folder its sandbox binds): the kernels of this test, or of
    a server the test started."""
    found = []
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(root_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                argv = proc.cmdline()
                for i, arg in enumerate(argv[:-1]):
                    if arg == "-f" and argv[i + 1].endswith(".json"):
                        found.append(argv[i + 1])
                    if arg == "--bind":  # a forked kernel's sandbox (bwrap holding it) binds its folder
                        found.extend(glob.glob(os.path.join(argv[i + 1], "kernel-*.json")))
    return sorted(set(found))


def remove_markers(paths: list[str], name: str) -> None:
    """Delete the markers an infection probe left on the host: only files of exactly that unique
    name (inside a private sandbox the same path is another file, or none)."""
    for path in paths:
        if os.path.basename(path) == name and os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.unlink(path)


def submission_calling(function: str, args: dict[str, Any] | None = None) -> str:
    """A `square` submission that runs `episode_probe.<function>()` when the hidden tests call it,
    i.e. while the grader holds them, and fails its test with the report if anything was found."""
    return (PROBE_SOURCE + "\n\ndef square(x):\n"
            f"    found = {function}(json.loads({json.dumps(args or {})!r}))\n"
            "    if found:\n"
            "        raise RuntimeError(json.dumps(found, default=str)[:1800])\n"
            "    return x * x\n")


SQUARE_TASK = {"id": "security/square", "timeout_s": 30,
               "tests": {"kind": "function", "entry_point": "square",
                         "check": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"}}
INFECTION = ("import builtins, os\nbuiltins.sbx_infected = {token!r}\nos.environ['SBX_INFECTED'] = {token!r}\n"
             "sbx_infected = {token!r}\n")


def remove_leftover_containers(kernels: list[Any]) -> list[str]:
    """Containers of these (closed) Docker kernels that outlived close(): removed, and reported as
    a warning (a known race: close() right after a cancelled request can miss the container)."""
    ids = [k.kernel_id for k in kernels if getattr(k, "name", "") == "docker"]
    if not ids:
        return []
    import warnings

    import docker

    client = docker.from_env()
    left = []
    for kernel_id in ids:
        for container in client.containers.list(all=True, filters={"label": f"sandbox-env.episode={kernel_id}"}):
            left.append(f"{container.short_id} ({container.status})")
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True)
    if left:
        warnings.warn(f"containers outlived their closed kernels (removed now): {left}", stacklevel=2)
    return left
