"""One step of the fake backend (`fake.py`): code run by a worker thread of this process, its
stdout/stderr captured per thread, its ending classified as a real kernel's would be.

NOT A SANDBOX: the code runs in the caller's own interpreter, with its rights. See `fake.py`.
"""

from __future__ import annotations

import ast
import ctypes
import linecache
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from sandbox_env.kernels.output import EXIT_CODES, OutputCapture
from sandbox_env.models import DisplayOutput, ExceptionInfo, ExecStatus, ExecutionResult
from sandbox_env.policy import Policy

# thread ident -> the step capturing what that thread prints. Module-wide, because sys.stdout is:
# every fake kernel of the process shares one router per stream.
_CAPTURES: dict[int, _Capture] = {}


class StepTimeout(KeyboardInterrupt):
    """Raised in the worker thread at the step's wall-time limit; a KeyboardInterrupt, as a real
    kernel's interrupt is, so `except Exception` in the code does not swallow it."""


class OutputLimit(BaseException):
    """Raised by a write past the policy's output_limit_bytes: the step stops there."""


class _Capture:
    """What one step printed: bounded like a real kernel's, dropped once the step is over."""

    def __init__(self, policy: Policy) -> None:
        self.out = OutputCapture(policy.output_bytes, policy.output_limit_bytes)
        self.active = True

    def write(self, name: str, data: str | bytes) -> None:
        if not self.active:  # an abandoned step still running: nobody reads it any more
            return
        if not self.out.over_limit:  # past the limit nothing more is kept: the step must stop
            self.out.write(name, data)
        if self.out.over_limit:
            raise OutputLimit


def _captured() -> _Capture | None:
    return _CAPTURES.get(threading.get_ident())


class _BinaryRouter:
    """`sys.stdout.buffer` of a captured thread: bytes, decoded (with replacement) by the capture."""

    def __init__(self, name: str) -> None:
        self._name = name

    def write(self, data: bytes) -> int:
        capture = _captured()
        if capture is not None:
            capture.write(self._name, bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""


class _Router:
    """Stands in for sys.stdout/stderr/stdin: a fake step's thread reads and writes its own step;
    every other thread gets the stream that was there before."""

    def __init__(self, name: str, fallback: Any) -> None:
        self._name, self._fallback = name, fallback

    def write(self, text: str) -> int:
        capture = _captured()
        if capture is None:
            return self._fallback.write(text) if self._fallback is not None else len(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        capture.write(self._name, text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if _captured() is None and self._fallback is not None:
            self._fallback.flush()

    def read(self, *_: Any) -> str:  # stdin of a step is empty, as a kernel's is
        return "" if _captured() is not None else self._fallback.read(*_)

    def readline(self, *_: Any) -> str:
        return "" if _captured() is not None else self._fallback.readline(*_)

    def readlines(self, *_: Any) -> list[str]:
        return [] if _captured() is not None else self._fallback.readlines(*_)

    def fileno(self) -> int:
        if _captured() is not None:  # no descriptor of the host's is handed to the code
            import io

            raise io.UnsupportedOperation("fileno: the fake backend has no file descriptors")
        return int(self._fallback.fileno())

    def isatty(self) -> bool:
        return False if _captured() is not None else bool(self._fallback.isatty())

    @property
    def buffer(self) -> Any:
        return _BinaryRouter(self._name) if _captured() is not None else self._fallback.buffer

    @property
    def encoding(self) -> str:
        return "utf-8" if _captured() is not None else getattr(self._fallback, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fallback, name)


def install_routers() -> None:
    """Put a router on each standard stream (again, when a test runner swapped one since)."""
    for name in ("stdout", "stderr", "stdin"):
        current = getattr(sys, name)
        if not isinstance(current, _Router):
            setattr(sys, name, _Router(name, current))


def raise_in(thread: threading.Thread, exc: type[BaseException]) -> bool:
    """Raise `exc` in `thread` at its next bytecode (a loop in C or a sleep delays it)."""
    if thread.ident is None:
        return False
    return bool(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc)))


def _checkpoint() -> None:
    """A Python call: the interpreter raises an exception sent to this thread at its start."""


class Step:
    """Runs `code` in `namespace` on a worker thread; `on_done` is called from that thread."""

    def __init__(self, code: str, namespace: dict[str, Any], policy: Policy, filename: str,
                 on_done: Callable[[], None]) -> None:
        self.code, self.namespace, self.filename = code, namespace, filename
        self.capture = _Capture(policy)
        self._on_done = on_done
        self.guard = threading.Lock()  # an interrupt lands in the code, never in this bookkeeping
        self.finished = self.timed_out = False
        self.exit_code: int | None = None  # SystemExit's
        self.exception: ExceptionInfo | None = None
        self.result: DisplayOutput | None = None
        self.cpu_s = 0.0
        self.thread = threading.Thread(target=self._main, name=f"fake-kernel {filename}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def interrupt(self) -> None:
        with self.guard:
            if not self.finished:
                raise_in(self.thread, StepTimeout)

    def _main(self) -> None:
        _CAPTURES[threading.get_ident()] = self.capture
        started = time.thread_time()
        ran = False
        while not self.finished:
            try:
                if not ran:
                    ran = True
                    self._run()
                with self.guard:  # no interrupt is sent once this is set...
                    self.finished = True
                _checkpoint()  # ...and one sent before lands here, not in the bookkeeping below
            except StepTimeout:  # landed just after the code ended: it ran past its limit all the same
                self.timed_out = True
        self.cpu_s = time.thread_time() - started
        _CAPTURES.pop(threading.get_ident(), None)
        self._on_done()

    def _run(self) -> None:
        linecache.cache[self.filename] = (len(self.code), None, self.code.splitlines(True), self.filename)
        try:
            body, last = _split(ast.parse(self.code, self.filename))
            exec(compile(body, self.filename, "exec"), self.namespace)  # noqa: S102 - the fake's purpose
            if last is not None:
                value = eval(compile(last, self.filename, "eval"), self.namespace)  # noqa: S307
                if value is not None:  # shown as Jupyter shows an execute_result: its repr on stdout
                    text = repr(value)
                    self.namespace["_"] = value
                    self.result = DisplayOutput(kind="execute_result", data={"text/plain": text})
                    self.capture.write("stdout", text + "\n")
        except StepTimeout:
            self.timed_out = True
        except OutputLimit:
            pass  # the capture knows
        except SystemExit as exc:
            self._exited(exc)
        except BaseException as exc:  # noqa: BLE001 - whatever the code raises is the step's result
            self._raised(exc)

    def _exited(self, exc: SystemExit) -> None:
        code = exc.code
        if code is None or code == 0:
            self.exit_code = 0
            return
        if isinstance(code, int) and not isinstance(code, bool):
            self.exit_code = code & 0xFF
        else:  # a message: printed, status 1, as the interpreter does
            self.exit_code = 1
        self._raised(exc)

    def _raised(self, exc: BaseException) -> None:
        text = _format(exc, self.filename)
        self.exception = ExceptionInfo(type=type(exc).__name__, message=str(exc), traceback=text)
        try:
            self.capture.write("stderr", text)
        except OutputLimit:
            pass

    def outcome(self, *, timed_out: bool, wall_s: float) -> ExecutionResult:
        """The step as a real kernel reports it (call once the thread ended or was abandoned)."""
        out = self.capture.out
        if timed_out or self.timed_out:
            status, exit_code, exception = ExecStatus.TIMEOUT, EXIT_CODES[ExecStatus.TIMEOUT], None
        elif out.over_limit:
            status, exit_code, exception = ExecStatus.OUTPUT_LIMIT, EXIT_CODES[ExecStatus.OUTPUT_LIMIT], None
        elif self.exit_code is not None:
            status = ExecStatus.OK if self.exit_code == 0 else ExecStatus.ERROR
            exit_code, exception = self.exit_code, self.exception
        else:
            status = ExecStatus.ERROR if self.exception else ExecStatus.OK
            exit_code, exception = EXIT_CODES[status], self.exception
        return ExecutionResult(
            stdout=out.stdout.getvalue(), stderr=out.stderr.getvalue(), exit_code=exit_code, status=status,
            exception=exception, wall_time_s=wall_s, cpu_time_s=self.cpu_s,
            stdout_truncated=out.stdout.truncated, stderr_truncated=out.stderr.truncated,
            displays=[self.result] if self.result is not None else [])


def _split(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    """The cell's statements, and its last expression apart (its value is shown, as in Jupyter)."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
        return tree, ast.Expression(last.value)  # type: ignore[attr-defined]
    return tree, None


def _format(exc: BaseException, filename: str) -> str:
    """The traceback from the cell's first frame on (the fake's own frames are not the code's)."""
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(type(exc), exc))
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))
