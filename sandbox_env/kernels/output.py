"""A step's output on the server: stdout + stderr bounded (`inside.bounded`), a hard cap, rich outputs."""

from __future__ import annotations

import re
from typing import Any

from sandbox_env.inside.bounded import TRUNCATION_MARK, BoundedOutput
from sandbox_env.models import DisplayOutput, ExceptionInfo, ExecStatus, ExecutionResult

__all__ = ["TRUNCATION_MARK", "BoundedOutput", "OutputCapture", "StepCollector", "strip_ansi"]


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


# Jupyter backend, kernel side. Runs once in the kernel at start, leaving no names behind:
# * plain Python has sys.stdout.buffer, ipykernel's OutStream does not; writing bytes is a common
#   idiom, so it gets an adapter that decodes incrementally with errors="replace";
# * ipykernel buffers output for 0.2 s before sending it, so a print loop can pile up hundreds of
#   MB in the kernel (an OOM instead of `output_limit`) and send them as one huge message. Here a
#   stream is flushed every CHUNK characters, and writes past the step's output limit are dropped
#   (the server stops the step at that point anyway).
KERNEL_SHIM = """
def _sbx_install(limit, chunk=65536):
    import codecs, ipykernel.iostream as iostream
    class _Buffer:
        def __init__(self, stream):
            self._stream, self._dec = stream, codecs.getincrementaldecoder("utf-8")("replace")
        def write(self, data):
            self._stream.write(self._dec.decode(bytes(data)))
            return len(data)
        def flush(self):
            self._stream.flush()
    def buffer(stream):
        buf = stream.__dict__.get("_sbx_buffer")
        if buf is None:
            buf = stream.__dict__["_sbx_buffer"] = _Buffer(stream)
        return buf
    out = iostream.OutStream
    out.buffer = property(buffer)
    out._sbx_pending = 0
    written = [0]
    write = out.write
    def bounded_write(self, text):
        if not isinstance(text, str):
            return write(self, text)
        size = len(text)
        before = written[0]
        written[0] = before + size
        if size < chunk and before + size <= limit:  # the common case: a small write
            write(self, text)
            pending = self._sbx_pending + size
            if pending >= chunk:
                pending = 0
                self.flush()
            self._sbx_pending = pending
            return size
        room = max(0, limit + chunk - before)
        for start in range(0, min(size, room), chunk):
            write(self, text[start:start + min(chunk, room - start)])
            self._sbx_pending = 0
            self.flush()
        return size
    out.write = bounded_write
    def reset():
        written[0] = 0
    get_ipython().events.register("pre_execute", reset)
_sbx_install(@LIMIT@)
del _sbx_install
"""


def kernel_shim(output_limit_bytes: int) -> str:
    """The start-up code above, for one policy's output limit."""
    return KERNEL_SHIM.replace("@LIMIT@", str(int(output_limit_bytes)))


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
EXIT_CODES = {ExecStatus.OK: 0, ExecStatus.ERROR: 1, ExecStatus.TIMEOUT: 124, ExecStatus.OOM: 137,
              ExecStatus.OUTPUT_LIMIT: 1}


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _bounded(text: str, keep_bytes: int) -> str:
    buf = BoundedOutput(keep_bytes)
    buf.write(text)
    return buf.getvalue()


def _size(data: dict[str, Any]) -> int:
    return sum(len(v) if isinstance(v, (str, bytes)) else len(str(v)) for v in data.values())


class StepCollector:
    """Turns the iopub messages of one Jupyter execute request into an `ExecutionResult`.

    Rich displays share the byte budget of the text streams: each is kept while the displays
    total at most `keep_bytes`, and every byte counts toward the hard limit.
    """

    def __init__(self, keep_bytes: int, hard_limit: int) -> None:
        self.out = OutputCapture(keep_bytes, hard_limit)
        self.keep_bytes = self.display_budget = keep_bytes
        self.displays: list[DisplayOutput] = []
        self.display_bytes = self.dropped_displays = 0
        self.exception: ExceptionInfo | None = None
        self.execution_count: int | None = None
        self.idle = False
        self.capturing = True

    @property
    def over_limit(self) -> bool:
        return self.out.over_limit

    def stop_capturing(self) -> None:
        """After an output flood: drain what is still queued without keeping it."""
        self.capturing = False

    def add(self, msg: dict[str, Any]) -> bool:
        """Record one iopub message of this request; True once the kernel reports idle."""
        kind, content = msg["msg_type"], msg["content"]
        if kind == "status":
            self.idle = content.get("execution_state") == "idle"
            return self.idle
        if kind == "error":  # bounded like the streams: a deep recursion has a huge traceback
            tb = _bounded(strip_ansi("\n".join(content.get("traceback") or [])), self.keep_bytes)
            message = _bounded(strip_ansi(str(content.get("evalue", ""))), min(self.keep_bytes, 8192))
            self.exception = ExceptionInfo(type=str(content.get("ename", ""))[:200], message=message, traceback=tb)
            if self.capturing:
                self.out.write("stderr", (tb or f"{self.exception.type}: {self.exception.message}") + "\n")
            return False
        if not self.capturing:
            return False
        if kind == "stream":
            self.out.write(content.get("name", "stdout"), content.get("text", ""))
        elif kind == "execute_result":
            data = content.get("data") or {}
            self.execution_count = content.get("execution_count")
            if "text/plain" in data:
                self.out.write("stdout", str(data["text/plain"]) + "\n")
            if set(data) - {"text/plain"}:
                self._display("execute_result", content)
        elif kind in ("display_data", "update_display_data"):
            self._display("display_data", content)
        return False

    def _display(self, kind: str, content: dict[str, Any]) -> None:
        data = content.get("data") or {}
        size = _size(data)
        self.out.extra += size
        self.display_bytes += size
        if self.display_bytes > self.display_budget:
            self.dropped_displays += 1
            return
        self.displays.append(DisplayOutput(kind=kind, data=data, metadata=content.get("metadata") or {}))

    def status_from(self, reply: dict[str, Any] | None) -> ExecStatus:
        content = (reply or {}).get("content", {})
        if content.get("execution_count") is not None:
            self.execution_count = content["execution_count"]
        if self.exception is not None or content.get("status") in ("error", "aborted"):
            return ExecStatus.ERROR
        return ExecStatus.OK

    def result(self, *, status: ExecStatus, wall: float, exit_status: int | None, cpu: float | None,
               peak_mb: float | None) -> ExecutionResult:
        if self.dropped_displays:
            self.out.write("stderr", f"[sandbox-env] {self.dropped_displays} rich outputs dropped "
                           f"(over {self.display_budget} bytes).\n")
        if status is ExecStatus.KILLED:
            code = 1 if not exit_status else (exit_status if exit_status > 0 else 128 - exit_status)
        else:
            code = EXIT_CODES.get(status, 1)
        return ExecutionResult(
            stdout=self.out.stdout.getvalue(), stderr=self.out.stderr.getvalue(), exit_code=code,
            status=status, exception=self.exception, wall_time_s=wall, cpu_time_s=cpu,
            peak_memory_mb=peak_mb, stdout_truncated=self.out.stdout.truncated,
            stderr_truncated=self.out.stderr.truncated, displays=self.displays,
            execution_count=self.execution_count,
        )
