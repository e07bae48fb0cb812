"""The program each SandboxFusion-style `/run_code` runs (`server/sandboxfusion/run_code.py`).

SandboxFusion runs `python <tmp>.py` in a fresh directory holding the request's `files`. This does
the same in the sandbox's working directory: it reads its job from stdin first (12 ASCII digits
giving the length, then JSON `{"code", "files", "fetch", "memory_mb", "mark"}`), with exact reads,
so every byte after the job is the program's own stdin. It writes the files, lowers the address
space limit to `memory_mb` when asked (as SandboxFusion's `memory_limit_MB` does), runs the code
as `__main__` from `main.py`, and prints an uncaught exception's traceback as Python does (exit
status 1). Then the files named in `fetch` go to stderr after the line `mark` (chosen by the
server for this run), base64-encoded in one JSON object. Standard library only; modules load
only when needed (starting is most of a short run's cost).

Another language (`language` in the job: its source file and commands, `languages.py`) is run in
stages, as SandboxFusion does: the source written beside the files, compiled under its own time
limit, then run as a child under `run_timeout_s`; the stages' reports follow `mark` too.
"""

import json
import os
import sys
import types

MAIN = "main.py"


def read(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise SystemExit("run_code: the job ended early")
        data += chunk
    return data


def inside(path):
    """`path` relative to the working directory, or None when it would leave it."""
    root = os.getcwd()
    full = os.path.normpath(os.path.join(root, path))
    return full if full.startswith(root + os.sep) else None


def write_files(files):
    import base64

    for name, content in files.items():
        full = inside(name)
        if full is None or not isinstance(content, str):
            continue
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as handle:
            handle.write(base64.b64decode(content))


def trailer(names, mark, stages=None):
    """After the line `mark` on stderr: the files named in `fetch` and the stages' reports."""
    import base64

    found = {}
    for name in names:
        full = inside(name)
        if full is not None and os.path.isfile(full):
            with open(full, "rb") as handle:
                found[name] = base64.b64encode(handle.read()).decode("ascii")
    sys.stderr.write("\n" + mark + "\n" + json.dumps({"files": found, "stages": stages}) + "\n")
    sys.stderr.flush()


def limit_memory(megabytes):
    import resource

    limit = megabytes * 1024 * 1024
    for kind in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        hard = resource.getrlimit(kind)[1]
        resource.setrlimit(kind, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def run(code):
    path = os.path.join(os.getcwd(), MAIN)
    with open(path, "w", encoding="utf-8", errors="replace") as handle:
        handle.write(code)
    sys.argv = [path]
    sys.path.insert(0, os.getcwd())  # -I left the script's directory out; `python main.py` has it
    module = types.ModuleType("__main__")  # the code's own __main__ (pickle finds its classes)
    module.__file__ = path
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    try:
        exec(compile(code, path, "exec", dont_inherit=True), module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # as the interpreter would print it, without this frame
        import traceback

        tb = exc.__traceback__
        traceback.print_exception(type(exc), exc, tb.tb_next if tb is not None else None)
        sys.stderr.flush()
        raise SystemExit(1) from None


def command(argv, folder):
    return [str(arg).replace("{dir}", folder) for arg in argv]


def head(fd, keep):
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, keep) if keep > 0 else b""
    os.close(fd)
    return data.decode("utf-8", "replace")


def scratch_file():
    """An unnamed file in TMPDIR (gone when closed): a compiler's output, bounded by its size."""
    return os.open(os.environ.get("TMPDIR") or "/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)


def start(argv, fds, memory_mb):
    """`argv` in a child of its own session with `fds` (target: source) placed; the memory limit
    is set in the child, before the exec. An exec that fails reports its error through a
    close-on-exec pipe (EOF: it ran). (pid, None) or (None, error)."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            for target, fd in fds.items():
                os.dup2(fd, target)
            os.closerange(3, report_w)  # nothing of this program's but 0-2 (as subprocess's close_fds)
            os.closerange(report_w + 1, os.sysconf("SC_OPEN_MAX"))
            if memory_mb:
                limit_memory(memory_mb)
            os.execvp(argv[0], argv)
        except BaseException as exc:  # noqa: BLE001 - said to the parent, whatever it is
            os.write(report_w, str(exc).encode("utf-8", "replace")[:1000])
        finally:
            os._exit(127)
    os.close(report_w)
    error = b"".join(iter(lambda: os.read(report_r, 4096), b""))
    os.close(report_r)
    if error:
        os.waitpid(pid, 0)
        return None, error.decode("utf-8", "replace")
    return pid, None


def wait(pid, timeout):
    """The exit code (-N: killed by signal N), or None when `timeout` passed first. A pidfd wakes
    this as the child ends (a poll with growing sleeps, as `subprocess` waits, oversleeps a
    compile by tens of milliseconds)."""
    import select
    import time

    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        select.select([pidfd] if pidfd is not None else [], [], [], left if pidfd is not None else min(left, 0.001))


def stage(argv, timeout, keep, memory_mb=0, capture=False):
    """One stage (compile, run) as a child in its own session, killed with it at `timeout`. A
    compiler's output goes to unnamed files (bounded by TMPDIR's size), of which `keep` bytes are
    read; a run's stdio is this program's own. SandboxFusion's fields: status, return_code, times."""
    import time

    fds = {}
    if capture:
        null = os.open(os.devnull, os.O_RDONLY)
        fds = {0: null, 1: scratch_file(), 2: scratch_file()}
    started = time.monotonic()
    pid, error = start(argv, fds, memory_mb)
    if pid is None:
        for fd in fds.values():
            os.close(fd)
        return {"status": "Error", "stderr": error}
    code = wait(pid, timeout)
    try:
        os.killpg(pid, 9)  # what it left running in its session
    except OSError:
        pass
    if code is None:
        os.waitpid(pid, 0)
    kill_children()  # and what left the session: nothing of the stage outlives this line
    # Measured only now: a stage (or what it started) that stopped this process ran past its
    # deadline, and is reported as over it, however it ended.
    elapsed = time.monotonic() - started
    late = code is not None and elapsed > timeout
    report = {"status": "TimeLimitExceeded" if code is None or late else "Finished",
              "return_code": None if late else code, "execution_time": elapsed}
    if capture:
        os.close(fds[0])
        report.update(stdout=head(fds[1], keep), stderr=head(fds[2], keep))
    return report


def harden():
    """Non-dumpable, as the grader is: the stages run as this uid, and could otherwise read or
    rewrite this process (its clock, the trailer's mark). A child subreaper: what a stage leaves
    (an orphan, a process cloned onto this one) becomes this process's child, for
    `kill_children`. They can still stop it: a stage that ended past its limit is reported as
    over it, however it ended."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def kill_children():
    """Kill and reap every child of this process, again until none is left (one killed hands its
    own children to this process)."""
    path = f"/proc/self/task/{os.getpid()}/children"
    for _ in range(64):
        try:
            with open(path) as handle:
                pids = [int(p) for p in handle.read().split()]
        except (OSError, ValueError):
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


def run_language(job):
    """Another language: the code written as its source file beside the request's files, compiled
    under the compile limit (nothing runs when that fails), then run under the run limit."""
    harden()
    lang, folder = job["language"], os.getcwd()
    with open(os.path.join(folder, lang["source"]), "w", encoding="utf-8", errors="replace") as handle:
        handle.write(job["code"])
    stages = {}
    if lang["compile"]:
        stages["compile"] = done = stage(command(lang["compile"], folder), float(lang["compile_timeout_s"]),
                                         int(job["keep"]), capture=True)
        if done["status"] != "Finished" or done["return_code"] != 0:
            return stages
    stages["run"] = stage(command(lang["run"], folder), float(job["run_timeout_s"]), 0, int(job.get("memory_mb") or 0))
    return stages


def main():
    job = json.loads(read(int(read(12))))
    if job.get("files"):
        write_files(job["files"])
    fetch = job.get("fetch") or []
    if job.get("language"):
        stages = run_language(job)
        trailer(fetch, job["mark"], stages)
        code = (stages.get("run") or {}).get("return_code") or 0
        if code < 0:  # died by a signal: so does this program, so the sandbox sees how (oom, killed)
            import signal

            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        raise SystemExit(code)
    if job.get("memory_mb"):
        limit_memory(int(job["memory_mb"]))
    try:
        run(job["code"])
    finally:
        try:
            sys.stdout.flush()
        finally:
            if fetch:
                trailer(fetch, job["mark"])


if __name__ == "__main__":  # run as `python3 -I -c <this text>`; importing it runs nothing
    main()
