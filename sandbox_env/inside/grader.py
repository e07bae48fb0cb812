"""The trusted grader program: runs inside the sandbox, loaded by `grader_loader.py`.

Stdlib only; it is sent, never installed. The program run is the short loader. Its stdin holds
two length-prefixed sections, read one at a time and exactly. First a compressed preamble, the
same at every grading: this file's source, `wire`, the child's CODEC and HOST (`grader_child.py`;
no HOST for stdio tests), and the server's bytecode magic with all of them compiled (used when the
magic matches; else the loader compiles the sources). The loader, non-dumpable from its first
line (same-uid processes cannot ptrace it or read its memory or fds), runs this module and calls
`boot()`, which forks the UNTRUSTED child, and only then reads the second section: the job
(tests + submission), which exists in the sandbox only from that moment. The child, holding no
byte of the job, runs only HOST until it is sent the submission (pipes only; a child needed
later is a fresh `python3 -I -S -c HOST`). The grader writes one JSON verdict to its own stdout.
Tests execute here, in the grader: the submission's functions are proxies that forward calls to
the child and get back plain builtin data, strictly decoded, so nothing the submission returns
or patches takes part in the comparison. A call that times out, kills the child or returns
something undecodable poisons its test, whatever the test code catches.
"""


# ruff: noqa: S102, BLE001
# (a grader execs task code and must survive anything that code raises)
from __future__ import annotations

import _signal as signal  # the C module: `signal` imports `enum` (milliseconds)
import builtins
import fcntl
import os
import select
import struct
import sys
import time

from sandbox_env.inside.procs import CHUNK, exchange, exit_status, set_dumpable
from sandbox_env.inside.wire import HEADER, VERDICT, tag

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    # Put in this namespace by the loader (`grader_loader.py`): the sources of CODEC and HOST
    # (`grader_child.py`), CODEC compiled, CODEC + HOST compiled (None for stdio tests), whether
    # the loader made this process non-dumpable, and the reader of the next stdin section.
    CODEC = HOST = ""
    CODEC_CODE: Any = None
    CHILD_CODE: Any = None
    HARDENED = False

    def section() -> bytes: ...

TMP = os.environ.get("TMPDIR") or "/tmp"
_SCRATCH = [0]


def scratch(root: str = TMP) -> str:
    """A fresh empty folder for a child's cwd (the sandbox wipes /tmp and $HOME after grading)."""
    while True:
        _SCRATCH[0] += 1
        path = os.path.join(root, f"g-{os.getpid()}-{_SCRATCH[0]}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def pipe() -> tuple[int, int]:
    """A pipe whose ends are >= 10, so that placing fds 0-4 in a child never clobbers them."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends[0], ends[1]


def spawn(args: list, fds: dict, home: str) -> int:
    """`python3 -I <args>` in its own session with exactly `fds` (target: source) and /dev/null
    elsewhere on 0-2; everything else this process holds is close-on-exec. posix_spawn: no
    subprocess import (milliseconds per grading)."""
    actions = [(os.POSIX_SPAWN_OPEN, n, os.devnull, os.O_RDWR, 0) for n in (0, 1, 2) if n not in fds]
    actions += [(os.POSIX_SPAWN_DUP2, source, target) for target, source in fds.items()]
    return os.posix_spawn(sys.executable, [sys.executable, "-I", *args], child_env(home), file_actions=actions,
                          setsid=True)


def child_env(home: str) -> dict:
    """The child's HOME and TMPDIR are its own scratch folder, never the grader's directory."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


def spawn_host(codec_host: str) -> tuple:
    """(pid, request fd, reply fd) of a child running HOST, which waits for the submission."""
    r1, w1 = pipe()
    r2, w2 = pipe()
    home = scratch()
    pid = spawn(["-S", "-c", codec_host, "3", "4", home, os.pathsep.join(sys.path)], {3: r1, 4: w2}, home)
    os.close(r1), os.close(w2)
    return pid, w1, r2


def fork_host(code: object) -> tuple:
    """spawn_host as a fork of this process: a millisecond instead of an interpreter start. Only
    before the job is read (the child gets a copy of this memory); later children are spawned."""
    r1, w1 = pipe()
    r2, w2 = pipe()
    home = scratch()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.dup2(r1, 3)
            os.dup2(w2, 4)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # 0 is the job's pipe, 1 the verdict's: neither is the child's
                os.dup2(null, fd)
            os.closerange(5, os.sysconf("SC_OPEN_MAX"))
            os.environ.clear()
            os.environ.update(child_env(home))
            sys.argv[:] = ["-c", "3", "4", home, os.pathsep.join(sys.path)]
            set_dumpable(True)  # dumpable again: the grader's protection, not its own
            exec(code, {"__name__": "__main__", "__builtins__": builtins})
        finally:
            os._exit(0)
    os.close(r1), os.close(w2)
    return pid, w1, r2


# -- stdio cases: one process each, forked from a zygote that holds none of the job ------------
class Zygote:
    """Forks a fresh process per stdio case: forked in boot(), before the job is read, it gets
    the submission (nothing else of the job), compiles it once, and forks a case in a millisecond
    where an interpreter start costs tens. It stays non-dumpable like the grader, so the cases it
    forks cannot read or drive it; a case that kills it only moves its later cases to spawned
    interpreters (`pid` None)."""

    def __init__(self) -> None:
        import _socket

        self.ctl, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        src_r, self.src_w = pipe()
        pid = os.fork()
        if pid == 0:
            try:
                self.ctl.close()
                os.close(self.src_w)
                zygote(theirs, src_r)
            finally:
                os._exit(0)
        theirs.close()
        os.close(src_r)
        self.ctl.settimeout(REAP_S)
        self.pid: int | None = pid

    def load(self, source: str) -> None:
        """Send the submission (once); the zygote compiles it while the grader goes on."""
        if self.src_w < 0:
            return
        data = source.encode("utf-8", "surrogatepass")
        try:
            while data:
                data = data[os.write(self.src_w, data[:CHUNK]):]
        except OSError:
            self.kill()
        finally:
            os.close(self.src_w)
            self.src_w = -1

    def fork(self, fds: list, home: str) -> int | None:
        """A case process with `fds` as its 0, 1, 2 and `home` as its cwd; its pid, or None when
        the zygote is gone (the caller spawns instead)."""
        import _socket

        if self.pid is None:
            return None
        try:
            self.ctl.sendmsg([home.encode()], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                                 struct.pack("3i", *fds))])
            reply = self.ctl.recv(64)
            return int(reply)
        except (OSError, ValueError):
            self.kill()
            return None

    def ended(self, deadline: float | None) -> tuple | None:
        """(wait status, CPU seconds) of the last case, as the zygote reaped it; None while it
        runs (past `deadline`, or at once when `deadline` is None)."""
        left = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if self.pid is None:
            return (signal.SIGKILL, None)
        if not select.select([self.ctl], [], [], left)[0]:
            return None
        try:
            status, cpu = self.ctl.recv(64).split()
            return int(status), float(cpu)
        except (OSError, ValueError):  # gone, or killed by a case: that case was not a clean run
            self.kill()
            return (signal.SIGKILL, None)

    def kill(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
            self.pid = None
        self.ctl.close()


def zygote(ctl: Any, src: int) -> None:
    """The zygote's loop: read the submission, then fork a case per request and report how it
    ended. It runs only this code; requests come from the grader alone (the cases never hold
    its socket)."""
    adopt_orphans()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # 0 is the job's pipe, 1 the verdict's: neither is the zygote's
        os.dup2(null, fd)
    os.close(null)
    keep = sorted((ctl.fileno(), src))
    os.closerange(3, keep[0])
    os.closerange(keep[0] + 1, keep[1])
    os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
    chunks = []
    while chunk := os.read(src, CHUNK):
        chunks.append(chunk)
    os.close(src)
    source = b"".join(chunks).decode("utf-8", "surrogatepass")
    try:
        code = compile(source, "<submission>", "exec", dont_inherit=True)
    except BaseException:
        code = None  # each case compiles it again, and fails as `python` would
    import traceback  # noqa: F401 - loaded once here: every case that raises prints with it
    space = __import__("_socket").CMSG_SPACE(struct.calcsize("3i"))
    while True:
        try:
            message, ancillary, _, _ = ctl.recvmsg(4096, space)
        except OSError:
            return
        fds = [fd for _, _, data in ancillary for fd in struct.unpack(f"{len(data) // 4}i", data[:len(data) // 4 * 4])]
        if not message or len(fds) != 3:
            return
        pid = os.fork()
        if pid == 0:
            run_case(code, source, fds, message.decode())
        for fd in fds:
            os.close(fd)
        ctl.send(b"%d" % pid)
        _, status, usage = os.wait4(pid, 0)
        kill_children()  # what the case left: its orphans, or a child it cloned onto this process
        ctl.send(b"%d %.6f" % (status, usage.ru_utime + usage.ru_stime))


def run_case(code: Any, source: str, fds: list, home: str) -> None:
    """One case, as `python3 -I -c RUNNER` runs it: its own session, the case's pipes as 0-2,
    nothing else open, its scratch folder as cwd, HOME and TMPDIR, dumpable again (the grader's
    protection is not its own), the submission as `__main__`; then exit as the interpreter would."""
    status = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(home)
        os.environ.clear()
        os.environ.update(child_env(home))
        set_dumpable(True)
        status = run_main(code, source)
    finally:
        os._exit(status)


def run_main(code: Any, source: str) -> int:
    import types

    streams = []  # as the interpreter made this process's own: the same encodings and buffering
    for fd, (mode, like) in enumerate((("r", sys.__stdin__), ("w", sys.__stdout__), ("w", sys.__stderr__))):
        streams.append(open(fd, mode, buffering=1 if fd == 2 else -1, closefd=False,  # noqa: SIM115
                            encoding=getattr(like, "encoding", "utf-8"), errors=getattr(like, "errors", "strict")))
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
    sys.argv = ["submission"]
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    try:
        exec(code if code is not None else compile(source, "<submission>", "exec", dont_inherit=True), main.__dict__)
        status = 0
    except SystemExit as exc:
        status = exit_status(exc.code)
    except BaseException as exc:
        import traceback

        tb = exc.__traceback__
        traceback.print_exception(type(exc), exc, tb.tb_next if tb is not None else None)
        status = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        __import__("atexit")._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = status or 120  # as the interpreter exits when its final flush fails
    return status


def boot() -> None:
    """Called by the loader once this module is loaded, before any byte of the job is read."""
    if not HARDENED:  # dumpable: same-uid processes could read the job out of this one
        emit({"tests": [], "hardened": False})
    # The grader's own directory: "/" is read-only in the sandbox (the submission writes only to
    # its scratch folders), so nothing the grader does relative to its cwd meets planted files.
    os.chdir("/")
    adopt_orphans()
    # The child only runs our HOST code until main() sends it the submission; forked now, it
    # holds none of the job. Children needed later are spawned afresh.
    early = fork_host(CHILD_CODE) if HOST else Zygote()
    main(section(), early)


PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> None:
    """Become the parent of whatever the grading's processes leave behind (a daemon that left
    its session outlives the kill of a case's group), so that `kill_children` can end it."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:  # no ctypes: what a case leaves runs on until the sandbox is torn down
        pass


def kill_children(spare: int | None = None) -> None:
    """Kill and reap every child of this process but `spare` (the grader's zygote): what a case
    (or the compiler) left running must not meet the next case, whose pipes the same uid reaches
    through /proc. Both the grader and the zygote adopt orphans, and a case's `clone(CLONE_PARENT)`
    makes a child of one of them: between the two, nothing of a case escapes."""
    path = f"/proc/self/task/{os.getpid()}/children"
    for _ in range(64):  # a leftover may fork while it is killed: its children come to us next
        try:
            with open(path) as f:
                pids = [int(p) for p in f.read().split() if int(p) != spare]
        except (OSError, ValueError):
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


MAX_FRAME = 64 << 20
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
OOM_FILES = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")

_CODEC: dict = {}
exec(CODEC_CODE, _CODEC)
loads, dumps, dec, encode = _CODEC["loads"], _CODEC["dumps"], _CODEC["dec"], _CODEC["enc"]


class Poison(BaseException):
    """Ends a test whatever it catches; `status` is the verdict for it."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class SubmissionError(Exception):
    """The submission raised an exception the grader does not re-raise as itself."""


# Exceptions of the submission that tests may expect (`pytest.raises(ValueError)`) are raised as
# themselves; any other name becomes SubmissionError. The child must not choose control flow:
# StopIteration would end `all(map(f, xs))` early (a pass), GeneratorExit/KeyboardInterrupt worse.
RERAISED = {cls.__name__: cls for cls in (
    ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, AttributeError, RuntimeError,
    NotImplementedError, ArithmeticError, OverflowError, RecursionError, LookupError, NameError)}


def write_back(args: tuple, changed: Any) -> None:
    """Apply the child's in-place changes of mutable arguments to the grader's own objects."""
    if changed is None:
        return
    if type(changed) is not list:
        raise ValueError("malformed argument changes")
    for item in changed:
        if type(item) is not list or len(item) != 2 or type(item[0]) is not int or not 0 <= item[0] < len(args):
            raise ValueError("malformed argument changes")
        old, new = args[item[0]], dec(item[1])
        if isinstance(old, list) and type(new) is list:
            old[:] = new
        elif isinstance(old, dict) and type(new) is dict:
            old.clear()
            old.update(new)
        elif isinstance(old, set) and type(new) is set:
            old.clear()
            old |= new


def oom_kills() -> int:
    for path in OOM_FILES:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return 0


class Child:
    """The untrusted process holding the submission; respawned after a kill."""

    def __init__(self, source: str) -> None:
        self.source, self.proc, self.exports = source, None, None
        self.dead_cpu = 0.0
        self.poison: Poison | None = None

    def spawn(self, early: tuple | None = None) -> None:
        """Start (or adopt) the interpreter; it runs only our HOST code until `start` sends the
        submission."""
        if early is not None:
            self.proc, self.w, self.r = early
            return
        self.proc, self.w, self.r = spawn_host(CODEC + HOST)

    def start(self, deadline: float) -> None:
        self.begin()
        self.finish(deadline)

    def begin(self) -> None:
        """Send the submission; the child loads it while we go on."""
        if self.proc is None:
            self.spawn()
        self.oom0 = oom_kills()
        self.send({"source": self.source})

    def finish(self, deadline: float) -> None:
        reply = self.recv(deadline)
        error = reply.get("error")
        if error is not None:
            self.kill()
            raise Poison("error", f"the submission failed to load: {str(error)[:2000]}")
        self.exports = reply.get("ok") if type(reply.get("ok")) is dict else {}

    def send(self, obj: Any) -> None:
        data = dumps(obj).encode()
        data = HEADER.pack(len(data)) + data
        try:
            while data:
                data = data[os.write(self.w, data):]
        except OSError:
            pass  # the child is gone: recv() says how

    def read(self, n: int, deadline: float) -> bytes:
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                self.kill()
                raise Poison("timeout", "time limit exceeded")
            chunk = os.read(self.r, min(n - len(buf), 1 << 20))
            if not chunk:
                code = self.kill()
                if oom_kills() > self.oom0:
                    raise Poison("oom", "the submission ran out of memory")
                raise Poison("error", f"the submission's process ended (exit code {code})")
            buf += chunk
        return buf

    def recv(self, deadline: float) -> Any:
        size = HEADER.unpack(self.read(4, deadline))[0]
        if size > MAX_FRAME:
            self.kill()
            raise Poison("error", "reply too large")
        try:
            reply = loads(self.read(size, deadline).decode())
        except (ValueError, RecursionError):
            self.kill()
            raise Poison("error", "malformed reply from the submission") from None
        if type(reply) is not dict:
            self.kill()
            raise Poison("error", "malformed reply from the submission")
        return reply

    def call(self, name: str, args: tuple, kwargs: dict, deadline: float) -> Any:
        if self.poison is not None:
            raise self.poison
        try:
            if self.proc is None:
                self.start(deadline)
            self.send({"name": name, "args": encode(list(args)), "kwargs": encode(kwargs)})
            reply = self.recv(deadline)
            if "unserializable" in reply or ("error" not in reply and "value" not in reply):
                raise Poison("error", "{} returned something that is not plain data: {}".format(name, str(reply.get("unserializable"))[:2000]))
            if "error" in reply:
                error = reply["error"]
                if type(error) is not list or len(error) != 2 or not all(type(x) is str for x in error):
                    raise Poison("error", "malformed reply from the submission")
                kind, message = error
                raise RERAISED.get(kind, SubmissionError)(message if kind in RERAISED else f"{kind}: {message}")
            try:
                value = dec(reply.get("value"))
                write_back(args, reply.get("args"))
            except (ValueError, TypeError, RecursionError, IndexError) as exc:
                raise Poison("error", f"{name} returned something that is not plain data: {exc}") from None
            return value
        except Poison as exc:
            self.poison = exc
            raise

    def cpu(self) -> float:
        if self.proc is None:
            return self.dead_cpu
        try:
            with open(f"/proc/{self.proc}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return self.dead_cpu + (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError, ValueError):
            return self.dead_cpu

    def kill(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        for fd in (self.w, self.r):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.killpg(proc, signal.SIGKILL)
        except OSError:
            pass
        code = None
        try:
            _, status, usage = os.wait4(proc, 0)
            self.dead_cpu += usage.ru_utime + usage.ru_stime
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass
        return code


def proxy(child: Child, name: str, state: dict) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return child.call(name, args, kwargs, state["deadline"])
    call.__name__ = call.__qualname__ = name
    return call


# The only modules imported here because the submission names them: pure stdlib modules that
# neither run code on import nor read files (a `__main__` module would, e.g. unittest's discovery).
IMPORTABLE = frozenset({
    "math", "re", "string", "itertools", "functools", "collections", "heapq", "bisect", "operator",
    "statistics", "fractions", "decimal", "random", "datetime", "copy", "typing", "dataclasses", "enum",
    "json", "hashlib", "textwrap", "unicodedata", "array", "cmath", "numbers"})


BUILTIN_NAMES = frozenset(dir(builtins))


def reserved(name: str) -> bool:
    """A name the submission may not set in the tests' globals."""
    return name in BUILTIN_NAMES or (name.startswith("__") and name.endswith("__"))


def namespace(child: Child, state: dict, trusted: dict | None = None, entry: str | None = None) -> dict:
    """Test globals: the submission's functions as proxies, its modules re-imported here, then
    the task's own definitions from a Python prompt (helpers like HumanEval's `poly`), which the
    submission cannot replace. Names of builtins, and dunder names (`__builtins__` is where the
    tests find theirs), are never taken from the submission."""
    ns: dict = {"__name__": "__grader__", "__builtins__": builtins}
    exports = child.exports or {}
    for alias, module in dict(exports.get("modules") or {}).items():
        # the names come from the child: exact members of the allowlist only
        if type(module) is str and module in IMPORTABLE and not reserved(str(alias)):
            try:
                ns[str(alias)] = __import__(module)
            except ImportError:  # the test fails with a NameError if it needs the module
                pass
    for key, value in dict(exports.get("values") or {}).items():
        try:
            if not reserved(str(key)):
                ns[str(key)] = dec(value)
        except (ValueError, TypeError, RecursionError):
            pass
    functions = [str(name) for name in exports.get("functions") or [] if not reserved(str(name))]
    for name in functions:
        ns[name] = proxy(child, name, state)
    ns.update(trusted or {})
    for name in functions:
        if name == entry or name not in ns or getattr(ns[name], "__stub__", False):
            ns[name] = proxy(child, name, state)
    return ns


def trusted_definitions(prelude: str) -> dict:
    """What a Python prompt defines, run here; its stubs (functions whose body is only a docstring,
    `pass` or `...`) are the submission's to write and are marked `__stub__`. A prompt of imports
    and stubs only is not run at all (nothing to trust, and its imports cost milliseconds)."""
    if not prelude.strip():
        return {}
    import _ast

    def is_stub(node: Any) -> bool:
        return isinstance(node, _ast.FunctionDef | _ast.AsyncFunctionDef) and all(
            isinstance(s, _ast.Pass) or (isinstance(s, _ast.Expr) and isinstance(s.value, _ast.Constant))
            for s in node.body)

    try:
        tree = compile(prelude, "<prompt>", "exec", _ast.PyCF_ONLY_AST, dont_inherit=True)
        if all(isinstance(n, _ast.Import | _ast.ImportFrom) or is_stub(n)
               or (isinstance(n, _ast.Expr) and isinstance(n.value, _ast.Constant)) for n in tree.body):
            return {}
        defined: dict = {"__name__": "__prompt__", "__builtins__": builtins}
        exec(compile(prelude, "<prompt>", "exec", dont_inherit=True), defined)
    except BaseException:  # a prose prompt: nothing trusted to take from it
        return {}
    for node in tree.body:
        if is_stub(node):
            defined[node.name] = type("Stub", (), {"__stub__": True})()
    return {k: v for k, v in defined.items() if not k.startswith("__")}


class TaskSourceError(Exception):
    """A test source of the task does not compile: the server does not compile a client's inline
    task (that would be its CPU), so the grader says so, as each affected test's error."""


def compile_task(source: str, where: str) -> Any:
    try:
        return compile(source, f"<{where}>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # too deep, too big: the same
        raise TaskSourceError(f"the task's {where} does not compile: {type(exc).__name__}: {exc}"[:2000]) from None


def run_test(name: str, child: Child | None, state: dict, timeout: float, body: Any) -> dict:
    start, cpu0 = time.monotonic(), child.cpu() if child else 0.0
    state["deadline"] = start + timeout
    if child is not None:
        child.poison = None
    status, message = "passed", ""
    try:
        body()
    except Poison as exc:
        status, message = exc.status, str(exc)
    except AssertionError as exc:
        status, message = "failed", (f"AssertionError: {exc}")[:2000] if str(exc) else "AssertionError"
    except BaseException as exc:  # anything else the test raised is an error
        status, message = "error", (f"{type(exc).__name__}: {exc}")[:2000]
    if child is not None and child.poison is not None:
        status, message = child.poison.status, str(child.poison)
    result = {"name": name, "status": status, "message": message,
              "wall_time_s": round(time.monotonic() - start, 6)}
    if child is not None:
        result["cpu_time_s"] = round(child.cpu() - cpu0, 6)
    return result


def grade_calls(job: dict, timeout: float, child: Child) -> list:
    """Function (check) and assert tests: executed here, against proxies."""
    spec, state = job["spec"], {"deadline": 0.0}
    results = []
    try:
        try:
            child.begin()
            trusted = trusted_definitions(job.get("prelude") or "")  # while the child loads
            child.finish(time.monotonic() + timeout)
            try:
                ns = namespace(child, state, trusted, spec.get("entry_point"))
            except Exception as exc:  # the child's list of names is untrusted data
                raise Poison("error", f"malformed reply from the submission: {exc!r}"[:2000]) from None
        except Poison as exc:
            ns, load_error = None, exc
        names = job["names"]  # the server's list: the one it checks the verdict against
        if ns is None:
            return [{"name": n, "status": load_error.status, "message": str(load_error)} for n in names]
        if spec["kind"] == "function":
            exec(compile_task(spec["check"], "check"), ns)
            entry = spec["entry_point"]
            if entry not in ns or getattr(ns[entry], "__stub__", False):
                return [{"name": "check", "status": "error", "message": f"{entry} is not defined by the submission"}]
            results.append(run_test("check", child, state, timeout, lambda: ns["check"](ns[entry])))
            return results
        if spec.get("setup"):
            exec(compile_task(spec["setup"], "setup"), ns)
        for name, statement in zip(names, spec["asserts"]):
            try:
                code = compile_task(statement, name)
            except TaskSourceError as exc:
                results.append({"name": name, "status": "error", "message": str(exc)})
                continue
            results.append(run_test(name, child, state, timeout, lambda code=code: exec(code, ns)))
        return results
    finally:
        child.kill()


# -- stdin/stdout programs --------------------------------------------------------------------
RUNNER = ("import os,sys\nos.chdir(sys.argv[2]);f=os.fdopen(int(sys.argv[1]),'rb');s=f.read();f.close()\n"
          "sys.argv=['submission']\n"
          "exec(compile(s,'<submission>','exec'),{'__name__':'__main__','__builtins__':__builtins__})\n")


class Spawned:
    """A case run by a new interpreter, this process's child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def ended(self, deadline: float | None) -> tuple | None:
        """(wait status, CPU seconds) once it exited; None while it runs past `deadline`."""
        while True:
            done, status, usage = os.wait4(self.pid, os.WNOHANG)
            if done:
                return status, round(usage.ru_utime + usage.ru_stime, 6)
            if deadline is None or time.monotonic() >= deadline:
                return None
            time.sleep(0.002)

    def reap(self) -> tuple:
        _, status, usage = os.wait4(self.pid, 0)
        return status, round(usage.ru_utime + usage.ru_stime, 6)


class Forked(Spawned):
    """A case forked by the zygote, which reaps it and reports how it ended."""

    def __init__(self, pid: int, zygote: Zygote) -> None:
        super().__init__(pid)
        self.zygote = zygote

    def ended(self, deadline: float | None) -> tuple | None:
        return self.zygote.ended(deadline)

    def reap(self) -> tuple:
        ended = self.zygote.ended(time.monotonic() + REAP_S)
        if ended is None:  # the zygote does not answer (stopped by a case): no later case waits on it
            self.zygote.kill()
        return ended or (signal.SIGKILL, None)


REAP_S = 5.0  # how long a killed case may take to be reported


def launch(argv: list, fds: dict, home: str) -> int:
    """A program of the task's language (the job gives its argv), started as spawn() starts Python:
    its own session, exactly `fds` (else /dev/null on 0-2; everything else this process holds is
    close-on-exec), the children's environment, `home` as cwd (posix_spawn has no chdir: this
    process, single-threaded, steps there for the spawn). posix_spawn: no copy of the grader's
    memory is made, and a case starts in a fraction of a fork's time. A program that cannot be
    started ends at once with 127, as a shell reports it."""
    actions = [(os.POSIX_SPAWN_OPEN, n, os.devnull, os.O_RDWR, 0) for n in (0, 1, 2) if n not in fds]
    actions += [(os.POSIX_SPAWN_DUP2, source, target) for target, source in fds.items()]
    os.chdir(home)
    try:
        return os.posix_spawnp(argv[0], argv, child_env(home), file_actions=actions, setsid=True)
    except OSError:
        pid = os.fork()
        if pid == 0:
            os._exit(127)
        return pid
    finally:
        os.chdir("/")


def command(argv: list, folder: str) -> list:
    return [str(arg).replace("{dir}", folder) for arg in argv]


def start_case(source: str, fds: list, pending: dict, zygote: Zygote | None, lang: dict | None,
               folder: str) -> Spawned:
    """The case's process, with `fds` as its 0, 1, 2: another language's command on what `folder`
    holds; Python forked by the zygote when there is one, else a new interpreter that reads the
    source from a pipe (added to `pending`)."""
    home = scratch()
    if lang is not None:
        return Spawned(launch(command(lang["run"], folder), dict(enumerate(fds)), home))
    if zygote is not None:
        zygote.load(source)
        pid = zygote.fork(fds, home)
        if pid is not None:
            return Forked(pid, zygote)
    src_r, src_w = pipe()
    pid = spawn(["-c", RUNNER, "3", home], {0: fds[0], 1: fds[1], 2: fds[2], 3: src_r}, home)
    os.close(src_r)
    pending[src_w] = source.encode()
    return Spawned(pid)


def run_stdio(source: str, stdin: bytes, timeout: float, limit: int, lang: dict | None = None,
              folder: str = "", zygote: Zygote | None = None) -> tuple[str, str, bytes, float | None]:
    """(status, message, stdout, cpu): one fresh process for one case. Python (`lang` None) gets
    the submission from the zygote or on a pipe; another language runs its command on what
    `folder` holds."""
    in_r, in_w = pipe()
    out_r, out_w = pipe()
    err_r, err_w = pipe()
    oom0 = oom_kills()
    pending: dict = {}
    proc = start_case(source, [in_r, out_w, err_w], pending, zygote, lang, folder)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    pending[in_w] = stdin
    status, code, (out, err), cpu = collect(proc, pending, [out_r, err_r], timeout, limit)
    if status is None and code != 0:
        status = "oom" if oom_kills() > oom0 else "error"
        kind = exception_type(err) if lang is None else f"killed by signal {-code}" if code < 0 else ""
        return status, "exit code {}{}".format(code, ": " + kind if kind else ""), out, cpu
    messages = {"timeout": "time limit exceeded", "output_limit": f"output passed {limit} bytes"}
    return status or "ok", messages.get(status or "", ""), out, cpu


def collect(proc: Spawned, pending: dict, fds: list, timeout: float, limit: int) -> tuple:
    """Feed `pending` (fd: bytes) and read `fds` until the process ends, its time is up or its
    output passes `limit`; then kill its session. (status or None, exit code, outputs, cpu)."""
    streams = {fd: bytearray() for fd in fds}
    outputs = list(streams.values())
    for fd in [*pending, *streams]:
        os.set_blocking(fd, False)
    deadline, status = time.monotonic() + timeout, None
    while streams and status is None:
        readable = exchange(pending, streams, deadline, os.close)
        if readable is None:
            status = "timeout"
            break
        for fd in readable:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                del streams[fd]
            elif sum(map(len, outputs)) + len(chunk) > limit:
                status = "output_limit"
            else:
                streams[fd] += chunk
    for fd in pending:
        os.close(fd)
    ended = proc.ended(deadline) if status is None else None
    if status is None and ended is None:
        status = "timeout"
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    if ended is None:
        ended = proc.reap()
    for fd in fds:
        os.close(fd)
    return status, os.waitstatus_to_exitcode(ended[0]), [bytes(o) for o in outputs], ended[1]


def build(job: dict, limit: int) -> tuple:
    """(folder, None): the submission written as the language's source file in a folder of its
    own (where programs may run: $HOME; /tmp may be noexec), compiled there if the language
    compiles; or (None, why) when it did not compile. The compiler is untrusted like the
    submission (a child in its own session, the policy's limits, `compile_timeout_s`); it never
    sees a byte of the tests, so its message is returned whole (up to 2000 characters)."""
    lang = job["language"]
    folder = scratch(os.environ.get("HOME") or TMP)
    with open(os.path.join(folder, lang["source"]), "w", encoding="utf-8", errors="replace") as f:
        f.write(job["submission"])
    if not lang["compile"]:
        return folder, None
    out_r, out_w = pipe()
    oom0 = oom_kills()
    pid = launch(command(lang["compile"], folder), {1: out_w, 2: out_w}, folder)
    os.close(out_w)
    timeout = float(lang["compile_timeout_s"])
    status, code, (out,), _ = collect(Spawned(pid), {}, [out_r], timeout, limit)
    text = out.decode("utf-8", "replace").replace(folder + "/", "")[:2000]
    if status == "timeout":
        return None, f"compilation ran past its {timeout:g} s limit"
    if status == "output_limit":
        return None, f"the compiler's output passed {limit} bytes"
    if code != 0:
        why = "the compiler ran out of memory" if oom_kills() > oom0 else f"exit code {code}"
        return None, f"compilation failed ({why}): {text}" if text else f"compilation failed ({why})"
    return folder, None


def exception_type(stderr: bytes | bytearray) -> str:
    """The exception type on a traceback's last line, nothing else of it: the submission's stderr
    may echo the hidden input back."""
    lines = stderr[-4096:].decode("utf-8", "replace").strip().splitlines()
    kind = lines[-1].split(":", 1)[0].strip() if lines else ""
    return kind if len(kind) <= 80 and kind.replace(".", "").replace("_", "").isalnum() else ""


def check_output(spec: dict, case: dict, output: str, ns: dict) -> tuple[bool, str]:
    expected, checker = case["output"], spec["checker"]
    if checker == "exact":
        return output == expected, "output differs"
    if checker == "custom":
        verdict = ns["check"](case["input"], output, expected)
        ok, why = (verdict if type(verdict) is tuple else (verdict, "checker rejected the output"))
        return ok is True, str(why)
    got, want = output.split("\n"), expected.split("\n")
    got, want = [" ".join(line.split()) for line in got], [" ".join(line.split()) for line in want]
    while got and not got[-1]:
        got.pop()
    while want and not want[-1]:
        want.pop()
    if checker == "whitespace":
        return got == want, first_difference(got, want)
    if checker == "unordered_lines":
        return sorted(got) == sorted(want), "lines differ (in any order)"
    got_t, want_t = " ".join(got).split(), " ".join(want).split()
    if len(got_t) != len(want_t):
        return False, f"expected {len(want_t)} tokens, got {len(got_t)}"
    for i, (a, b) in enumerate(zip(got_t, want_t)):
        if a == b:
            continue
        try:
            x, y = float(a), float(b)
        except ValueError:
            return False, f"token {i + 1} differs"
        if not (abs(x - y) <= spec["abs_tol"] or abs(x - y) <= spec["rel_tol"] * abs(y)):
            return False, f"token {i + 1} is not within tolerance"
    return True, ""


def first_difference(got: list, want: list) -> str:
    """Where the output first differs, never what it holds (it may be the echoed hidden input)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"line {i + 1} differs"
    return f"expected {len(want)} lines, got {len(got)}"


def grade_stdio(job: dict, timeout: float, zygote: Zygote | None = None) -> list:
    spec, limit = job["spec"], int(job.get("output_limit") or 1 << 24)
    ns: dict = {"__name__": "__checker__", "__builtins__": builtins}
    if spec["checker"] == "custom":
        exec(compile_task(spec["checker_source"], "checker_source"), ns)
    lang, folder = job.get("language"), ""
    if lang is not None:
        folder, why = build(job, limit)
        kill_children(zygote.pid if zygote is not None else None)
        if folder is None:  # every test fails the same way: reward 0, the compiler's message
            return [{"name": name, "status": "compile_error", "message": why} for name in job["names"]]
    results = []
    for i, case in enumerate(spec["cases"]):
        start = time.monotonic()
        status, message, out, cpu = run_stdio(job["submission"], case["input"].encode(), timeout, limit, lang, folder,
                                              zygote)
        kill_children(zygote.pid if zygote is not None else None)
        if status == "ok":
            try:
                ok, why = check_output(spec, case, out.decode("utf-8", "replace"), ns)
                status, message = ("passed", "") if ok else ("failed", f"wrong answer on case {i}: {why[:200]}")
            except BaseException as exc:  # a broken custom checker fails the case; its text may quote the output
                status, message = "error", f"checker raised {type(exc).__name__}"
        results.append({"name": job["names"][i], "status": status, "message": message[:300],
                        "wall_time_s": round(time.monotonic() - start, 6), "cpu_time_s": cpu})
    return results


# -- pytest files -----------------------------------------------------------------------------
def memory_files(files: dict) -> dict:
    """{path: (name, source)}: each test file in a memfd, reached as /proc/<grader>/fd/N, a folder
    no other process can list, open or write (the grader is non-dumpable). Nothing on disk."""
    paths = {}
    for name, source in files.items():
        fd = os.memfd_create(name)  # close-on-exec
        os.write(fd, source.encode())
        paths[f"/proc/{os.getpid()}/fd/{fd}"] = (name, source)
    return paths


# Names pytest acts on when it finds them in a test module: a submission's names must never reach
# a test module as these (through `from solution import *`), or its proxies would be collected as
# tests, run as setup, or registered as hooks that decide outcomes.
PYTEST_NAMES = ("test", "Test", "pytest", "setup", "teardown")


def star_exports(names: Any) -> list:
    """What `from <module> import *` may take from the submission's module."""
    return sorted(n for n in names if not n.startswith(("_", *PYTEST_NAMES)) and n != "conftest")


def memory_plugin(pytest: Any, paths: dict, blocked: str) -> Any:
    """Collects exactly the task's files, compiled from the grader's memory: no path, conftest or
    ini file of the filesystem takes part. The submission's module can never be a plugin, and
    only tests written in the task's files run."""
    import types

    class MemoryModule(pytest.Module):
        def _getobj(self) -> Any:
            name, source = paths[str(self.path)]
            module = types.ModuleType(name.removesuffix(".py").replace("/", "."))
            module.__file__ = str(self.path)  # tracebacks read the lines back from the memfd
            exec(compile(source, str(self.path), "exec", dont_inherit=True), module.__dict__)
            self.config.pluginmanager.consider_module(module)
            return module

    class Memory:
        def pytest_configure(self, config: Any) -> None:
            config.pluginmanager.set_blocked(blocked)

        @pytest.hookimpl(tryfirst=True)
        def pytest_collect_file(self, file_path: Any, parent: Any) -> Any:
            if str(file_path) not in paths:
                return None
            return MemoryModule.from_parent(parent, path=file_path, nodeid=paths[str(file_path)][0])

        def pytest_collection_modifyitems(self, items: list) -> None:
            items[:] = [item for item in items if written_in(item, paths)]

    return Memory()


def written_in(item: Any, paths: dict) -> bool:
    """A test function whose code is in one of the task's files (not a proxy of the submission's)."""
    code = getattr(getattr(item, "function", None), "__code__", None)
    return code is not None and code.co_filename in paths


def pytest_args(paths: dict) -> list:
    """Only our files; no ini file (-c /dev/null), no conftest, no cache; rootdir and confcutdir
    are the grader's own fd folder."""
    private = f"/proc/{os.getpid()}/fd"
    return [*paths, "-q", "-c", os.devnull, "--rootdir", private, "--confcutdir", private, "--noconftest",
            "-p", "no:cacheprovider", "-p", "no:randomly", "--tb=short", "--assert=plain"]


def grade_pytest(job: dict, timeout: float, child: Child) -> list:
    """pytest runs here with `sys.modules[module]` a module of proxies, on the task's files only."""
    import types

    try:
        import pytest  # type: ignore[import-not-found]
    except ImportError:
        return [{"name": "pytest", "status": "error", "message": "pytest is not available in this sandbox"}]
    spec, state = job["spec"], {"deadline": time.monotonic() + timeout}
    try:
        child.start(time.monotonic() + timeout)
    except Poison as exc:
        return [{"name": "pytest", "status": exc.status, "message": str(exc)}]
    module = types.ModuleType(spec["module"])
    trusted = trusted_definitions(job.get("prelude") or "")
    module.__dict__.update({k: v for k, v in namespace(child, state, trusted).items() if not k.startswith("__")})
    module.__all__ = star_exports(module.__dict__)
    sys.modules[spec["module"]] = module
    paths = memory_files(spec["files"])
    results: list = []

    class Collector:
        def pytest_runtest_setup(self, item: Any) -> None:
            state["start"], state["cpu"] = time.monotonic(), child.cpu()
            state["deadline"] = state["start"] + timeout
            child.poison = None

        def pytest_runtest_logreport(self, report: Any) -> None:
            if report.when == "call" or report.outcome != "passed":
                status = {"passed": "passed", "failed": "failed", "skipped": "error"}[report.outcome]
                if report.when != "call" and status == "failed":
                    status = "error"
                message = str(report.longreprtext or "")[-2000:]
                for path, (name, _) in paths.items():  # the memfd's path means nothing to a reader
                    message = message.replace(path.lstrip("/"), name)
                if child.poison is not None:
                    status, message = child.poison.status, str(child.poison)
                results.append({"name": report.nodeid.split("::", 1)[-1], "status": status, "message": message,
                                "wall_time_s": round(time.monotonic() - state.get("start", time.monotonic()), 6),
                                "cpu_time_s": round(child.cpu() - state.get("cpu", 0.0), 6)})

    sys.dont_write_bytecode = True
    try:
        code = pytest.main(pytest_args(paths), plugins=[memory_plugin(pytest, paths, spec["module"]), Collector()])
    finally:
        child.kill()
    if not results:
        return [{"name": "pytest", "status": "error", "message": f"no test ran (pytest exit code {int(code)})"}]
    return results


def asserts_enabled() -> bool:
    """False under -O: then no test could fail, so the grader refuses to grade."""
    try:
        assert False  # noqa: B011 - the point: it vanishes under -O
    except AssertionError:
        return True
    return False


def main(job_data: bytes, early: tuple | Zygote | None) -> None:
    verdict_fd = os.dup(1)  # the verdict channel: only this process ever writes to it
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    job = loads(job_data.decode())
    key = bytes.fromhex(job.pop("key"))  # signs the verdict; never leaves this process
    kind = job["spec"]["kind"]
    zygote = early if isinstance(early, Zygote) else None
    child: Child | Zygote | None = zygote
    if kind != "stdio":
        if zygote is not None:
            zygote.kill()
        child = Child(job["submission"])
        child.spawn(early if isinstance(early, tuple) else None)
    verdict = {"error": "the grader runs without asserts"}
    if asserts_enabled():  # graded outside the except block: test errors must not chain to it
        grade = grade_stdio if kind == "stdio" else grade_pytest if kind == "pytest" else grade_calls
        try:
            tests = grade(job, float(job["timeout_s"]), child)
        except TaskSourceError as exc:
            tests = [{"name": name, "status": "error", "message": str(exc)} for name in job["names"]]
        finally:
            if child is not None:
                child.kill()
        verdict = {"tests": tests, "hardened": HARDENED}
    emit(verdict, verdict_fd, key)


def emit(verdict: dict, fd: int = 1, key: bytes | None = None) -> None:
    """Write the verdict and end at once: no interpreter teardown the sandbox would wait for.

    With the job's key, the verdict is its tag (hex) and a newline, then the JSON: whatever else
    reaches the server as this program's stdout cannot carry a verdict the server accepts."""
    data = dumps(verdict).encode()
    if key is not None:
        data = tag(key, VERDICT, 0, data).hex().encode() + b"\n" + data
    while data:
        data = data[os.write(fd, data):]
    try:
        sys.stderr.flush()
    finally:
        os._exit(0)
