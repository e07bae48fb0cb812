"""In-container supervisor: PID 1 of a Docker sandbox, sole holder of the channel to the server.

`DockerKernel` sends a bundle of this package's modules over the container's stdin to a one-line
bootstrap, so an image needs nothing but `/usr/bin/python3` and the runner always matches the
server's version. The bootstrap runs as the container's PID 1 (no docker-init), and its first act
is to become non-dumpable: the channel is the container's stdin/stdout, which only PID 1 holds, and
a non-dumpable process's `/proc/1/fd` cannot be opened by the other processes of its uid. PID 1 is
also immune to signals sent from inside its namespace, so episode code can neither stop nor kill
it. On top of that every frame is authenticated (`wire.Channel`), with a key that arrives only
after the zygote and the first worker are forked (neither holds it), and workers started later
are new interpreters (`exec_worker`), never forks of this memory.

Why two processes: the user's code runs in the worker, whose fd 1/2 are capture pipes and which
never holds the channel fds, so nothing it prints or writes can forge a result frame. The
supervisor enforces the step deadline and the output cap, and after a timeout, a crash or a flood
it SIGKILLs every process in the container (all but itself and the zygote) and starts a fresh
worker, so the episode goes on with an empty namespace and no stray daemon. As PID 1 it also reaps
every orphan. The server keeps its own deadline as a backstop and replaces the whole container
when the supervisor stops answering. Programs (`run` frames: the grader) are forks of the zygote
(`zygote.py`), on a clean slate.
"""

from __future__ import annotations

import base64
import os
import select
import signal
import sys
import time

from sandbox_env.inside.bounded import BoundedOutput
from sandbox_env.inside.bundle import rebundle
from sandbox_env.inside.procs import CHUNK, exchange, set_dumpable
from sandbox_env.inside.recycle import folder_states, recycle, unix_sockets
from sandbox_env.inside.slate import WORKSPACE, count_processes, kill_all_but, others_alive, process_state, wipe, wipe_ipc
from sandbox_env.inside.untrusted import step_fields, variables
from sandbox_env.inside.wire import HEADER, KEY_SIZE, Anomaly, Channel, decode, read_frame, read_raw, write_frame
from sandbox_env.inside.worker import Worker
from sandbox_env.inside.zygote import WORKER, Zygote

TYPE_CHECKING = False  # typing costs 10 ms at container start; mypy reads this as True
if TYPE_CHECKING:
    from typing import Any

PACKAGE = "sandbox_env.inside"
WORKER_MODULES = tuple(f"{PACKAGE}.{name}" for name in ("wire", "procs", "snapshot", "worker"))
SNAPSHOT_BYTES = 64 << 10  # the worker's snapshot of its namespace passed on (the server bounds it again)
EMPTY_SNAPSHOT = '{"variables":[],"total":0,"truncated":false}'  # a restarted worker's namespace
IGNORED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTSTP",
           "SIGTTIN", "SIGTTOU")
EXIT_ERROR, EXIT_TIMEOUT, EXIT_OUTPUT = 1, 124, 1
MEMORY_FILES = (("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill"),
                ("/sys/fs/cgroup/memory.events", "oom_kill"))
USAGE_FILES = ("/sys/fs/cgroup/memory/memory.usage_in_bytes", "/sys/fs/cgroup/memory.current")


def open_fd(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def probe() -> dict[str, Any]:
    """What the sandbox looks like from inside (uid, seccomp, capabilities), for the server's log."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Seccomp", "NoNewPrivs", "CapEff", "CapBnd", "CapPrm"):
                status[key] = value.strip()
    return {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "python": sys.version.split()[0],
            **status}


PROGRESS_S = 0.1  # a running step's new output goes to the server at most this often
PROGRESS_CHARS = 64 << 10  # of each stream per progress frame (its tail: the server keeps a tail too)


class Progress:
    """A running step's output as it arrives, sent to the server in `progress` frames (the final
    result still carries all of it): so inspection shows a step's output while it runs."""

    def __init__(self, channel: Channel, request_id: object) -> None:
        import codecs

        self.channel, self.request_id = channel, request_id
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        self.pending = {"stdout": "", "stderr": ""}
        self.sent_at = 0.0

    def add(self, name: str, data: bytes) -> None:
        text = self.pending[name] + self.decoders[name].decode(data)
        self.pending[name] = text[-PROGRESS_CHARS:]

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (self.pending["stdout"] or self.pending["stderr"]) or (not force and now - self.sent_at < PROGRESS_S):
            return
        frame = {"op": "progress", "id": self.request_id, **self.pending}
        self.pending = {"stdout": "", "stderr": ""}
        self.sent_at = now
        self.channel.send(frame)


class Supervisor:
    """Owns the channel and the worker; one request at a time."""

    progress: Progress | None = None  # set while a step runs

    def __init__(self, config: dict[str, Any], closing: tuple[int, ...], zygote: Zygote) -> None:
        self.closing, self.zygote = closing, zygote
        self.baseline = process_state(os.getpid())  # limits, nice, CPUs: what every program must get
        # Once true, workers are new interpreters, never forks of this process: its memory has held
        # the channel's key, or a program's input (a grading's hidden tests).
        self.exec_workers = False
        self.asked = 0  # requests sent to workers, numbered across restarts
        self.keep = int(config["output_bytes"])
        self.limit = int(config["output_limit_bytes"])
        self.cpu_budget = config.get("cpu_time_s")
        self.cpu_used = 0.0
        self.worker = 0
        self.oom_file = next(((fd, key) for path, key in MEMORY_FILES if (fd := open_fd(path)) is not None), None)
        self.oom_seen = self.oom_kills()  # more since: the memory limit was hit (no recycle)
        try:  # the mode the tmpfs option asks for (Docker copies the image folder's up), and each wipe leaves
            os.chmod(WORKSPACE, 0o700)
        except OSError:
            pass
        self.folders = folder_states()  # what a recycle must find them as
        self.unix_sockets = unix_sockets()  # ours and the zygote's: any other left is an episode's
        self.spawn()

    def spawn(self, from_zygote: bool = False) -> bool:
        """Start a worker: a fork of this process (the first), a new interpreter (later ones), or,
        for a recycle, a fork of the zygote (fast, and as clean as the first). False: none started."""
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        theirs, ours = (cmd_r, res_w, out_w, err_w), (cmd_w, res_r, out_r, err_r)
        cpu_left = None if self.cpu_budget is None else max(1, int(self.cpu_budget - self.cpu_used + 0.999))
        if from_zygote:
            message = b"%s %d %s" % (WORKER, self.keep, b"-" if cpu_left is None else b"%d" % cpu_left)
            pid = self.zygote.launch(list(theirs), 5.0, message)
        else:
            pid = self.fork_worker(theirs, ours, cpu_left)
        for fd in theirs:
            os.close(fd)
        if not pid:
            for fd in ours:
                os.close(fd)
            self.worker = 0
            return False
        for fd in (res_r, out_r, err_r):
            os.set_blocking(fd, False)
        self.worker, self.cmd, self.res, self.out, self.err = pid, cmd_w, res_r, out_r, err_r
        self.replies = bytearray()  # what the worker wrote on its result pipe, not yet taken
        self.exited: tuple[int, int] | None = None
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None
        return True

    def fork_worker(self, theirs: tuple[int, int, int, int], ours: tuple[int, int, int, int],
                    cpu_left: int | None) -> int:
        """Fork (then, once the key is here, exec) a worker on `theirs`; its pid."""
        for _attempt in range(200):  # the pid limit may still be full of dying processes
            try:
                pid = os.fork()
                break
            except BlockingIOError:
                time.sleep(0.01)
        else:
            raise RuntimeError("cannot fork a worker")
        if pid == 0 and self.exec_workers:
            exec_worker(theirs, self.keep, cpu_left)
        if pid == 0:
            code = 70
            try:
                cmd_r, res_w, out_w, err_w = theirs
                for fd in (*self.closing, *self.zygote.fds(), *ours):
                    os.close(fd)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                os.close(out_w)
                os.close(err_w)
                set_dumpable(True)
                Worker(cmd_r, res_w, self.keep, cpu_left).loop()
                code = 0
            finally:
                os._exit(code)
        return pid

    def oom_kills(self) -> int | None:
        """The container cgroup's OOM-kill count (cgroup v1 memory.oom_control, v2 memory.events)."""
        if self.oom_file is None:
            return None
        fd, key = self.oom_file
        try:
            data = os.pread(fd, 4096, 0)
            start = data.index(key.encode() + b" ") + len(key) + 1
            return int(data[start:data.index(b"\n", start)])
        except (OSError, ValueError):
            return None

    def reap(self) -> tuple[int, int] | None:
        """(exit code, signal) of the worker once it has ended, else None."""
        if self.exited is not None:
            return self.exited
        try:
            pid, status, usage = os.wait4(self.worker, os.WNOHANG)
        except ChildProcessError:
            self.exited = (0, 0)
            return self.exited
        if pid == 0:
            return None
        self.cpu_used += usage.ru_utime + usage.ru_stime
        if os.WIFSIGNALED(status):
            self.exited = (128 + os.WTERMSIG(status), os.WTERMSIG(status))
        else:
            self.exited = (os.waitstatus_to_exitcode(status), 0)
        return self.exited

    def reap_orphans(self) -> None:
        """As PID 1 this process inherits every orphan: reap the dead ones (a zombie still holds a
        pid under the pids limit), never the worker or the zygote, whose statuses are read
        elsewhere."""
        keep, me = (self.worker, self.zygote.pid), os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in keep:
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
                if state == b"Z" and int(ppid) == me:
                    os.waitpid(int(entry), os.WNOHANG)
            except (OSError, ValueError):
                continue

    def ensure_worker(self) -> None:
        """Programs leave no worker behind (a grading sandbox may never need one): fork it now."""
        if not self.worker:
            self.spawn()

    def restart(self) -> None:
        """Kill every process but init, this one and the zygote; fork a new worker."""
        self.kill_everything()
        self.spawn()

    def kill_everything(self) -> None:
        """Close the worker's pipes and SIGKILL every other process until none is left."""
        if self.worker:
            for fd in (self.cmd, self.res, self.out, self.err):
                os.close(fd)
        self.kill_others()
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.worker, self.pidfd = 0, None

    def kill_others(self) -> None:
        """SIGKILL every process but init, this one and the zygote, until none is left."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            spare = self.zygote.pid
            try:
                kill_all_but(spare) if spare else os.kill(-1, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.reap_orphans()
            if self.worker and self.reap() is None:
                if self.pidfd is None:
                    time.sleep(0.002)
                else:  # readable once the worker has exited
                    select.select([self.pidfd], [], [], 0.05)
                continue
            if not others_alive(spare):
                break
            time.sleep(0.001)

    def execute(self, code: str, timeout: float) -> dict[str, Any]:
        out, err = BoundedOutput(self.keep), BoundedOutput(self.keep)
        self.ensure_worker()
        if (ended := self.reap()) is not None:  # died between steps (a daemon killed it, say)
            err.write(f"[sandbox-env] the interpreter had died since the last step (exit code {ended[0]}); "
                      "this step runs in a fresh one\n")
            self.restart()
        if self.cpu_budget is not None and self.cpu_used >= self.cpu_budget:
            return self.result("killed", 137, out, err, note="the episode's CPU-time budget is spent")
        oom_before = self.oom_kills()
        self.ask({"op": "exec", "code": code})
        reply, ended = self.wait(time.monotonic() + timeout, out, err)
        if reply is not None:
            drain(self.out, out, self.limit - err.total)
            drain(self.err, err, self.limit - out.total)
            if out.total + err.total <= self.limit:
                # What the worker says is only about its own step, but it is checked and bounded here.
                fields, dropped = step_fields(reply, self.keep)
                failed = fields["exception"] is not None or reply.get("exception") is not None
                code = reply.get("exit_code")  # SystemExit(n): n, as the code asked
                exit_code = (code if type(code) is int and 0 < code < 256 else EXIT_ERROR) if failed else 0
                note = f"the interpreter's report was malformed ({', '.join(dropped)}): dropped" if dropped else ""
                snapshot = reply.get("snapshot")
                if type(snapshot) is str and len(snapshot) <= SNAPSHOT_BYTES:
                    fields["snapshot"] = snapshot
                return {**self.result("error" if failed else "ok", exit_code, out, err, note=note), **fields}
            status, exit_code, note = "output_limit", EXIT_OUTPUT, f"output passed {self.limit} bytes"
        elif ended is not None:
            oom = (self.oom_kills() or 0) > (oom_before or 0)
            if oom:
                status, exit_code, note = "oom", 137, "the memory limit was hit"
            elif ended[1]:
                status, exit_code, note = "killed", ended[0], f"the interpreter died (exit code {ended[0]})"
            else:  # os._exit(n): the code's own status, as a program's
                status, exit_code = "ok" if ended[0] == 0 else "error", ended[0]
                note = f"the interpreter exited (exit code {ended[0]})"
        elif out.total + err.total > self.limit:
            status, exit_code, note = "output_limit", EXIT_OUTPUT, f"output passed {self.limit} bytes"
        else:
            status, exit_code, note = "timeout", EXIT_TIMEOUT, f"the step ran past its {timeout:g} s limit"
        self.restart()
        return self.result(status, exit_code, out, err, note=note + "; the interpreter was restarted "
                           "(variables lost)", snapshot=EMPTY_SNAPSHOT)

    def ask(self, request: dict[str, Any]) -> None:
        """Send the worker a request, numbered: `wait` takes only the reply with that number, so a
        reply the code wrote itself (it can reach its own result pipe) is the last its step gets."""
        self.asked += 1
        try:
            write_frame(self.cmd, {**request, "seq": self.asked})
        except BrokenPipeError:
            pass  # the worker is gone: wait() reaps it and reports

    def wait(self, deadline: float, out: BoundedOutput, err: BoundedOutput) -> tuple[dict[str, Any] | None, tuple[int, int] | None]:
        """Pump the capture pipes until the worker replies (to the last request), dies, floods or
        runs out of time."""
        poller = select.poll()
        streams = {self.out: out, self.err: err}
        for fd in (*streams, self.res, *([self.pidfd] if self.pidfd is not None else [])):
            poller.register(fd, select.POLLIN)
        watch_pidfd = self.pidfd is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, None
            tick = remaining if watch_pidfd else min(remaining, 0.05)
            check_exit = not watch_pidfd
            for fd, _ in poller.poll(max(1, int(tick * 1000))):
                if fd == self.pidfd:
                    check_exit = True
                    continue
                data = read_some(fd)
                if data is None:
                    continue
                if not data:
                    poller.unregister(fd)
                elif fd in streams:
                    streams[fd].write(data)
                    if out.total + err.total > self.limit:
                        return None, None
                    if self.progress is not None:
                        self.progress.add("stdout" if fd == self.out else "stderr", data)
                else:
                    self.replies += data
                    reply, garbled = self.take_reply()
                    if garbled:
                        poller.unregister(fd)  # the worker is not trusted: its step will time out
                    elif reply is not None:
                        return reply, None
            if self.progress is not None:
                self.progress.flush()
            if check_exit and (ended := self.reap()) is not None:
                drain(self.out, out, self.limit)
                drain(self.err, err, self.limit)
                return None, ended
            if check_exit and watch_pidfd and self.pidfd is not None:
                poller.unregister(self.pidfd)
                watch_pidfd = False

    def take_reply(self) -> tuple[dict[str, Any] | None, bool]:
        """(the reply to the last request if the bytes read so far hold it, whether they are
        garbled). Replies to earlier requests are dropped; bytes of a frame not yet whole stay."""
        max_frame = 4 * self.keep + (1 << 20)
        while len(self.replies) >= HEADER.size:
            size = HEADER.unpack_from(self.replies)[0]
            if size > max_frame:
                return None, True
            if len(self.replies) < HEADER.size + size:
                return None, False
            try:
                reply = decode(bytes(self.replies[HEADER.size:HEADER.size + size]))
            except (ValueError, RecursionError):
                return None, True
            del self.replies[:HEADER.size + size]
            if reply.get("seq") == self.asked:
                return reply, False
        return None, False

    def result(self, status: str, exit_code: int, out: BoundedOutput, err: BoundedOutput, note: str = "",
               **extra: Any) -> dict[str, Any]:
        if note:
            err.write(f"\n[sandbox-env] {note}\n")
        return {"status": status, "exit_code": exit_code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                "stdout_truncated": out.truncated, "stderr_truncated": err.truncated, **extra}

    def run_program(self, source: str, stdin: bytes, timeout: float) -> dict[str, Any]:
        """`python3 -I -c source` as the only process (a fork of the zygote): every other one
        killed, workspace and /tmp wiped before (and after), stdin fed then closed, output
        bounded, the deadline enforced."""
        self.kill_everything()
        dirty = wipe()
        wipe_ipc()
        if self.zygote.pid and process_state(self.zygote.pid) != self.baseline:
            self.zygote.kill()  # limits lowered, niced, pinned: a fresh one inherits ours
        started = time.monotonic()
        out, err = BoundedOutput(self.limit), BoundedOutput(self.keep)
        oom_before = self.oom_kills()
        if others_alive(self.zygote.pid):  # a process the kills could not end: nothing runs beside it
            status, (code, cpu), note = "error", (126, 0.0), "a process of the sandbox could not be killed"
        elif dirty:  # nothing runs beside what an earlier program or step left and could not be removed
            status, (code, cpu), note = "error", (126, 0.0), "the sandbox's scratch folders could not be emptied"
        else:
            status, (code, cpu), note = self.launch(source, stdin, out, err, started + timeout)
        dirty += wipe()
        wipe_ipc()
        if status is None:
            oom = code < 0 and (self.oom_kills() or 0) > (oom_before or 0)
            status = "ok" if code == 0 else "oom" if oom else "killed" if code < 0 else "error"
        reply = {**self.result(status, 128 - code if code < 0 else code, out, err, note=note),
                 "wall_time_s": time.monotonic() - started, "cpu_time_s": round(cpu, 6)}
        if process_state(os.getpid()) != self.baseline:  # cannot be undone from inside: replace us
            reply["tampered"] = "the sandbox's own limits, priority or CPUs were changed"
        elif others_alive(self.zygote.pid):
            reply["tampered"] = "a process of the sandbox could not be killed"
        elif dirty:
            reply["tampered"] = f"scratch folders could not be emptied: {', '.join(sorted(set(dirty)))}"
        return reply

    def launch(self, source: str, stdin: bytes, out: BoundedOutput, err: BoundedOutput,
               deadline: float) -> tuple[str | None, tuple[int, float], str]:
        """Run a program through the zygote and stop whatever is left of it: (why it was stopped
        or None, (exit code, negative for a signal; CPU seconds), a note)."""
        self.exec_workers = True
        ends = [os.pipe() for _ in range(4)]  # stdin, stdout, stderr, source
        theirs = [ends[0][0], ends[1][1], ends[2][1], ends[3][0]]
        ours = [ends[0][1], ends[1][0], ends[2][0], ends[3][1]]
        pid = self.zygote.launch(theirs, 5.0) if self.zygote.ensure() else 0
        for fd in theirs:
            os.close(fd)
        if not pid:
            for fd in ours:
                os.close(fd)
            self.kill_others()  # a zygote that forked but never answered was killed: so is its fork
            return "error", (126, 0.0), "the program could not be started"
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except OSError:  # already exited and reaped
            pidfd = None
        status = pump({ours[3]: source.encode(), ours[0]: stdin}, {ours[1]: out, ours[2]: err}, deadline, self.limit)
        # Its exit is watched on a pidfd, not on the zygote's report: the program may stop the zygote.
        ended = None
        if status is None and pidfd is not None:
            if not select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                status = "timeout"  # it closed its output but ran on
        elif status is None:  # no pidfd here: the zygote's report it is
            ended = self.zygote.wait(deadline - time.monotonic())
            status = None if ended is not None or not self.zygote.pid else "timeout"
        if pidfd is not None:
            os.close(pidfd)
        self.kill_others()  # also resumes a stopped zygote
        if ended is None and self.zygote.pid:
            ended = self.zygote.wait(5.0)
        if ended is None:
            self.zygote.kill()
            return status, (-signal.SIGKILL, 0.0), "the program's exit status was lost (it killed the zygote)"
        return status, ended, ""

    def inspect(self) -> dict[str, Any]:
        self.ensure_worker()
        self.ask({"op": "inspect"})
        reply, _ = self.wait(time.monotonic() + 2.0, BoundedOutput(self.keep), BoundedOutput(self.keep))
        if reply is None:
            self.restart()
            reply = {}
        usage = next((v for v in map(read_int, USAGE_FILES) if v is not None), None)
        return {"variables": variables(reply.get("variables")), "memory_mb": None if usage is None else usage / 1048576,
                "cpu_time_used_s": self.cpu_used, "processes": count_processes()}


def pump(pending: dict[int, bytes], streams: dict[int, BoundedOutput], deadline: float, limit: int) -> str | None:
    """Feed each `pending` fd its bytes then close it; collect `streams` until all of them end.
    Closes every fd given; returns why it stopped early ("timeout", "output_limit"), else None."""
    owned = [*pending, *streams]
    for fd in owned:
        os.set_blocking(fd, False)
    streams, sinks, status = dict(streams), list(streams.values()), None

    def close(fd: int) -> None:
        os.close(fd)
        owned.remove(fd)

    for fd in [fd for fd, data in pending.items() if not data]:
        del pending[fd]
        close(fd)
    while streams:
        readable = exchange(pending, streams, deadline, close)
        if readable is None:
            status = "timeout"
            break
        for fd in readable:
            data = read_some(fd)
            if data == b"":
                del streams[fd]
            elif data:
                streams[fd].write(data)
        if sum(sink.total for sink in sinks) > limit:
            status = "output_limit"
            break
    for fd in owned:
        os.close(fd)
    return status


def read_some(fd: int) -> bytes | None:
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return None


def drain(fd: int, sink: BoundedOutput, budget: int) -> None:
    """Take what is already in a pipe, without waiting for writers that stay alive."""
    while sink.total <= budget:
        data = read_some(fd)
        if not data:
            return
        sink.write(data)


def read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def exec_worker(fds: tuple[int, int, int, int], keep: int, cpu_left: int | None) -> None:
    """In a forked child: become a worker in a new interpreter (`python3 -I -S`), so that nothing
    of the supervisor's memory (the channel's key, a program's input) is in the worker's. Never
    returns."""
    cmd, res, out, err = fds
    boot = (f"{rebundle(*WORKER_MODULES)}\nimport os\nos.set_inheritable(3, False)\nos.set_inheritable(4, False)\n"
            f"from {PACKAGE}.worker import Worker\nWorker(3, 4, {keep}, {cpu_left!r}).loop()\n")
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.dup2(cmd, 3)
        os.dup2(res, 4)
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", boot])
    finally:
        os._exit(70)


def main() -> None:
    """Runs as PID 1. Start-up frames are plain (no episode code exists yet): the config, then, once
    the zygote and the first worker are forked, the channel's key. Every frame after that is
    authenticated. An anomaly ends the container: PID 1 exiting kills every process in it."""
    if not set_dumpable(False):
        raise SystemExit("cannot make the supervisor non-dumpable: refusing to run")
    chan_in, chan_out = os.dup(0), os.dup(1)  # private, non-inheritable copies of the channel
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    for name in IGNORED:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    config = read_frame(chan_in)
    if config is None:
        return
    # The zygote first: forked now, its memory holds no request, no step, no program and no key.
    zygote = Zygote((chan_in, chan_out))
    supervisor = Supervisor(config, (chan_in, chan_out), zygote)
    key = read_raw(chan_in)
    if key is None or len(key) != KEY_SIZE:
        return
    supervisor.exec_workers = True
    channel = Channel(chan_in, chan_out, key)
    del key
    channel.send({"op": "ready", "id": 0, "probe": probe()})
    try:
        serve(channel, supervisor)
    except Anomaly as exc:  # the server learns of it on the authenticated channel, then sees EOF
        channel.send({"op": "anomaly", "id": None, "why": str(exc)})
    os.kill(-1, signal.SIGKILL)


def serve(channel: Channel, supervisor: Supervisor) -> None:
    while True:
        request = channel.recv()
        if request is None:
            return
        supervisor.reap_orphans()
        op, result = request.get("op"), {}
        if op == "exec":
            supervisor.progress = Progress(channel, request.get("id"))
            try:
                result = supervisor.execute(str(request["code"]), float(request["timeout"]))
            finally:
                supervisor.progress = None
        elif op == "inspect":
            result = supervisor.inspect()
        elif op == "recycle":
            result = recycle(supervisor)
        elif op == "run":
            result = supervisor.run_program(str(request["source"]), base64.b64decode(request.get("stdin") or ""),
                                            float(request["timeout"]))
        channel.send({**result, "op": "result", "id": request.get("id")})  # ours last: never overridden
