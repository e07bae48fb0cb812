"""A step's output on the server: stdout + stderr bounded (`inside.bounded`), a hard cap, rich outputs;
the Jupyter kernel's messages checked, and its start-up code."""

from __future__ import annotations

import re
from typing import Any

from sandbox_env.inside import bundle
from sandbox_env.inside.bounded import TRUNCATION_MARK, BoundedOutput
from sandbox_env.inside.kernel_startup import NOTE
from sandbox_env.kernels.inspection import SNAPSHOT_BYTES, LiveOutput, parse_snapshot
from sandbox_env.models import DisplayOutput, ExceptionInfo, ExecStatus, ExecutionResult

__all__ = ["TRUNCATION_MARK", "BoundedOutput", "KernelAnomaly", "OutputCapture", "StepCollector", "check_reply",
           "died", "kernel_shim", "strip_ansi"]


class OutputCapture:
    """stdout + stderr of one step, with a shared hard limit that stops the step."""

    __slots__ = ("extra", "hard_limit", "stderr", "stdout")

    def __init__(self, keep_bytes: int, hard_limit: int) -> None:
        self.stdout = BoundedOutput(keep_bytes)
        self.stderr = BoundedOutput(keep_bytes)
        self.hard_limit = hard_limit
        self.extra = 0  # bytes of rich outputs, which count toward the hard limit too

    def write(self, name: str, data: bytes | str) -> None:
        (self.stderr if name == "stderr" else self.stdout).write(data)

    @property
    def total(self) -> int:
        return self.stdout.total + self.stderr.total + self.extra

    @property
    def over_limit(self) -> bool:
        """True once the step printed more than the policy's `output_limit_bytes`."""
        return self.total > self.hard_limit


def kernel_shim(output_limit_bytes: int) -> str:
    """The kernel's start-up code (`inside/kernel_startup.py`) for one policy's output limit; it
    runs in the user namespace (`--IPKernelApp.exec_lines`) and leaves no name behind."""
    return bundle("procs", "snapshot", "kernel_startup") + (
        "__import__('sys').modules['sandbox_env.inside.kernel_startup']"
        f".install(get_ipython(), {int(output_limit_bytes)})\n")


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
EXIT_CODES = {ExecStatus.OK: 0, ExecStatus.ERROR: 1, ExecStatus.TIMEOUT: 124, ExecStatus.OOM: 137,
              ExecStatus.KILLED: 137, ExecStatus.OUTPUT_LIMIT: 1}
STATES = ("busy", "idle", "starting")
RICH = ("execute_result", "display_data", "update_display_data")
MAX_DEPTH = 32  # nesting of a JSON display (the observation is serialised recursively)


class KernelAnomaly(Exception):
    """A message no honest kernel sends (or none at all where one is due): the kernel is lost."""


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def died(exit_status: int) -> tuple[ExecStatus, int]:
    """A kernel process that ended by itself: its own exit status n (`ok` for 0, as a program's),
    or `killed` by signal s (exit code 128 + s)."""
    if exit_status < 0:
        return ExecStatus.KILLED, 128 - exit_status
    return (ExecStatus.OK if exit_status == 0 else ExecStatus.ERROR), exit_status


def _bounded(text: str, keep_bytes: int) -> str:
    buf = BoundedOutput(keep_bytes)
    buf.write(text)
    return buf.getvalue()


# The in-kernel meter sends a stream every 64 KiB or 0.2 s: a step's honest messages number in the
# hundreds to low thousands.
MAX_MESSAGES = 20_000
# A display offers one representation per MIME type: a handful (IPython's richest objects have 8).
MAX_MIME_TYPES = 32


def _size(data: dict[str, Any]) -> int:
    """What a mapping from the kernel costs to keep: its keys as much as its values."""
    return sum(len(k) + (len(v) if isinstance(v, (str, bytes)) else len(str(v))) for k, v in data.items())


def _shallow(value: Any) -> bool:
    """JSON values nested at most MAX_DEPTH deep."""
    level = [value]
    for _ in range(MAX_DEPTH):
        level = [v for item in level for v in (item.values() if isinstance(item, dict) else
                                                 item if isinstance(item, list) else ())]
        if not level:
            return True
    return False


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise KernelAnomaly(what)


def parent_id(msg: Any) -> str | None:
    """The request a message answers (None: none); raises KernelAnomaly for a malformed one."""
    _need(isinstance(msg, dict), "a message that is not an object")
    parent, content = msg.get("parent_header"), msg.get("content")
    _need(isinstance(msg.get("msg_type"), str), "a message without a type")
    _need(isinstance(parent, dict) and isinstance(parent.get("msg_id", ""), str), "a malformed parent header")
    _need(isinstance(content, dict), f"{msg['msg_type'][:40]!r} without a content object")
    return parent.get("msg_id")


def check_reply(msg: Any, msg_id: str) -> dict[str, Any] | None:
    """`msg` if it is the execute_reply to `msg_id`, None if it answers another request."""
    if parent_id(msg) != msg_id:
        return None
    content = msg["content"]
    _need(msg["msg_type"] == "execute_reply", "a reply of the wrong type")
    _need(isinstance(content.get("status"), str), "a reply without a status")
    count = content.get("execution_count")
    _need(count is None or type(count) is int, "a reply with a malformed execution count")
    _need(isinstance(content.get("user_expressions", {}), dict), "a reply with malformed expressions")
    return msg  # type: ignore[no-any-return]


def _rich(content: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    data, metadata = content.get("data"), content.get("metadata") or {}
    _need(isinstance(data, dict) and all(isinstance(k, str) for k in data), "a display without a data object")
    _need(isinstance(metadata, dict), "a display with malformed metadata")
    _need(len(data) <= MAX_MIME_TYPES and len(metadata) <= MAX_MIME_TYPES, "a display with too many keys")
    _need(_shallow(data) and _shallow(metadata), "a display nested too deep")
    return data, metadata


class StepCollector:
    """Turns the iopub messages of one Jupyter execute request into an `ExecutionResult`.

    Rich displays share the byte budget of the text streams: each is kept while the displays
    total at most `keep_bytes`, and every byte counts toward the hard limit. The kernel's start-up
    code (`inside/kernel_startup.py`) adds notes: its meter cut the output at the limit, the code
    exited with status n. Whatever the kernel sends is checked: a malformed message, or one that
    breaks the protocol, ends the step with `anomaly` set (the kernel is lost).
    """

    def __init__(self, keep_bytes: int, hard_limit: int, live: LiveOutput | None = None) -> None:
        self.out = OutputCapture(keep_bytes, hard_limit)
        self.live = live  # watchers of the running step see each output as it arrives
        self.snapshot_text: str | None = None  # the step's last snapshot note, parsed by `snapshot`
        self.hard_limit, self.foreign_bytes = hard_limit, 0  # messages answering no request of ours
        self.messages = 0  # each costs the server a parse, whatever its size
        self.keep_bytes = self.display_budget = keep_bytes
        self.displays: list[DisplayOutput] = []
        self.display_bytes = self.dropped_displays = 0
        self.exception: ExceptionInfo | None = None
        self.execution_count: int | None = None
        self.idle = False
        self.capturing = True
        self.cut = False  # the kernel's meter stopped the output at the limit
        self.exit_code: int | None = None  # SystemExit(n) or os._exit(n), as the kernel reported
        self.exited = False  # os._exit: the process ends
        self.anomaly: str | None = None

    @property
    def over_limit(self) -> bool:
        return self.cut or self.out.over_limit

    def stop_capturing(self) -> None:
        """After an output flood: drain what is still queued without keeping it."""
        self.capturing = False

    def add(self, msg: Any, msg_id: str | None = None) -> bool:
        """Record one iopub message (only those of request `msg_id`, when given); True once the
        step is over: the kernel is idle, its process is exiting, or it broke the protocol."""
        try:
            self.messages += 1
            _need(self.messages <= MAX_MESSAGES, f"over {MAX_MESSAGES} messages in one step")
            parent = parent_id(msg)
            if msg_id is not None and parent != msg_id:  # cost the server all the same: counted
                self.foreign_bytes += _size(msg["content"])
                _need(self.foreign_bytes <= self.hard_limit, "a flood of messages answering no request")
                return False
            return self._add(msg["msg_type"], msg["content"])
        except KernelAnomaly as exc:
            self.anomaly = str(exc)
        except Exception as exc:  # noqa: BLE001 - whatever the kernel sent, it never breaks the server
            self.anomaly = f"an unreadable message ({type(exc).__name__})"
        return True

    def _add(self, kind: str, content: dict[str, Any]) -> bool:
        if kind == "status":
            state = content.get("execution_state")
            _need(state in STATES, "a malformed status")
            self.idle = state == "idle"
            return self.idle
        if kind == NOTE:
            return self._note(content)
        if kind == "error":  # bounded like the streams: a deep recursion has a huge traceback
            ename, evalue, tb = content.get("ename", ""), content.get("evalue", ""), content.get("traceback") or []
            _need(isinstance(ename, str) and isinstance(evalue, str) and isinstance(tb, list)
                  and all(isinstance(line, str) for line in tb), "a malformed error")
            if ename == "SystemExit" and self.exit_code == 0:
                return False  # a clean exit is no error
            text = _bounded(strip_ansi("\n".join(tb)), self.keep_bytes)
            message = _bounded(strip_ansi(evalue), min(self.keep_bytes, 8192))
            self.exception = ExceptionInfo(type=ename[:200], message=message, traceback=text)
            if self.capturing:
                self.out.write("stderr", (text or f"{self.exception.type}: {self.exception.message}") + "\n")
                if self.live is not None:
                    self.live.write("stderr", (text or f"{self.exception.type}: {self.exception.message}") + "\n")
            return False
        if kind == "stream":
            name, text = content.get("name"), content.get("text")
            _need(name in ("stdout", "stderr") and isinstance(text, str), "a malformed stream")
            if self.capturing:
                self.out.write(name, text)  # type: ignore[arg-type]
                if self.live is not None:
                    self.live.write(name, text)  # type: ignore[arg-type]
        elif kind in RICH:
            data, metadata = _rich(content)
            count = content.get("execution_count")
            _need(count is None or type(count) is int, "a malformed execution count")
            if kind == "execute_result":
                self.execution_count = count
            if not self.capturing:
                return False
            if kind == "execute_result" and "text/plain" in data:
                self.out.write("stdout", str(data["text/plain"]) + "\n")
                if self.live is not None:
                    self.live.write("stdout", str(data["text/plain"]) + "\n")
            if kind != "execute_result" or set(data) - {"text/plain"}:
                self._display("execute_result" if kind == "execute_result" else "display_data", data, metadata)
        return False

    def _note(self, content: dict[str, Any]) -> bool:
        event, code = content.get("event"), content.get("code")
        if event == "output_limit":
            self.cut = True
            return False
        if event == "snapshot":  # the episode's to forge: only the last is kept, parsed once, bounded
            data = content.get("data")
            self.snapshot_text = data if type(data) is str and len(data) <= SNAPSHOT_BYTES else None
            return False
        _need(event in ("exit", "os_exit") and type(code) is int and 0 <= code <= 255, "a malformed note")
        self.exit_code = code
        self.exited = event == "os_exit"
        return self.exited

    def _display(self, kind: str, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        size = _size(data) + _size(metadata)
        self.out.extra += size
        self.display_bytes += size
        if self.display_bytes > self.display_budget:
            self.dropped_displays += 1
            return
        self.displays.append(DisplayOutput(kind=kind, data=data, metadata=metadata))
        if self.live is not None:
            self.live.display(data, size)

    @property
    def snapshot(self) -> dict[str, Any] | None:
        """The namespace's variables after the step, as the kernel's start-up code listed them."""
        return parse_snapshot(self.snapshot_text)

    def status_from(self, reply: dict[str, Any] | None) -> ExecStatus:
        """The status of a step that ended normally, from its execute_reply (`check_reply`)."""
        content = (reply or {}).get("content", {})
        if content.get("execution_count") is not None:
            self.execution_count = content["execution_count"]
        if self.exit_code is not None:  # SystemExit(n) / os._exit(n): n says it
            return ExecStatus.OK if self.exit_code == 0 else ExecStatus.ERROR
        if self.exception is not None or content.get("status") in ("error", "aborted"):
            return ExecStatus.ERROR
        return ExecStatus.OK

    def result(self, *, status: ExecStatus, wall: float, exit_code: int | None = None, cpu: float | None,
               peak_mb: float | None) -> ExecutionResult:
        """`exit_code` by default: the code's own (SystemExit, os._exit) for ok/error, else the status's."""
        if self.dropped_displays:
            self.out.write("stderr", f"[sandbox-env] {self.dropped_displays} rich outputs dropped "
                           f"(over {self.display_budget} bytes).\n")
        if exit_code is None:
            own = self.exit_code if status in (ExecStatus.OK, ExecStatus.ERROR) else None
            exit_code = own if own is not None else EXIT_CODES.get(status, 1)
        return ExecutionResult(
            stdout=self.out.stdout.getvalue(), stderr=self.out.stderr.getvalue(), exit_code=exit_code,
            status=status, exception=self.exception, wall_time_s=wall, cpu_time_s=cpu,
            peak_memory_mb=peak_mb, stdout_truncated=self.out.stdout.truncated,
            stderr_truncated=self.out.stderr.truncated, displays=self.displays,
            execution_count=self.execution_count,
        )
