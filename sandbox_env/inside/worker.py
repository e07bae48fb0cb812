"""In-container worker: the persistent namespace where the episode's code runs, REPL style.

Started by the supervisor (`runner.py`): forked before the channel has a key, later a new
interpreter. Stdlib only.
Semantics follow a notebook cell: the value of a trailing expression is printed to stdout (and kept
as `_`), rich reprs (`_repr_html_`, `_repr_png_`, ...) become display outputs, `display()` is a
builtin, top-level `await` works, and exceptions come back as type, message and a traceback that
starts at the user's code. Its fd 1/2 are the supervisor's capture pipes; the control pipe it
answers on carries only what this process says about itself, which the supervisor bounds.
"""

from __future__ import annotations

import ast
import base64
import builtins
import io
import json
import linecache
import os
import resource
import signal
import sys
import traceback
import types

from sandbox_env.inside.procs import exit_status
from sandbox_env.inside.snapshot import encoded
from sandbox_env.inside.wire import read_frame, write_frame

TYPE_CHECKING = False  # typing costs 10 ms at container start; mypy reads this as True
if TYPE_CHECKING:
    from typing import Any

RESTORED = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTSTP", "SIGTTIN",
            "SIGTTOU")
MIME_METHODS = (("_repr_html_", "text/html"), ("_repr_markdown_", "text/markdown"),
                ("_repr_svg_", "image/svg+xml"), ("_repr_png_", "image/png"),
                ("_repr_jpeg_", "image/jpeg"), ("_repr_latex_", "text/latex"),
                ("_repr_json_", "application/json"))
PLAIN_TYPES = (int, float, complex, bool, str, bytes, type(None))
SIZED_TYPES = (list, tuple, dict, set, frozenset, bytearray)
INTERNAL_FILES = ("<sandbox_env.inside.worker>", "<sandbox_env.inside.runner>")


def clean(text: str) -> str:
    """Lone surrogates cannot cross JSON to every client: replace them."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _write_file(path: str, data: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(data)
    except OSError:
        pass


class Worker:
    """Runs cells in one `__main__` namespace and answers on the control pipe."""

    def __init__(self, cmd: int, res: int, keep: int, cpu_left: int | None) -> None:
        self.cmd, self.res, self.keep = cmd, res, keep
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for name in RESTORED:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        os.setsid()
        _write_file("/proc/self/oom_score_adj", "1000")  # the memory limit kills us, not the supervisor
        if cpu_left is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_left, cpu_left + 1))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=True)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr  # type: ignore[misc]
        sys.argv = [""]
        sys.path.insert(0, "")
        try:
            import site

            site.main()
        except Exception:  # a broken site-packages must not cost the episode its interpreter  # noqa: BLE001, S110
            pass
        self.module = types.ModuleType("__main__")
        self.module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = self.module
        self.ns = self.module.__dict__
        builtins.display = self.display  # type: ignore[attr-defined]
        sys.meta_path.append(IPythonShim)  # type: ignore[arg-type]
        sys.displayhook = self.displayhook
        self.count = 0
        self.pid = os.getpid()
        self.displays: list[dict[str, Any]] = []
        self.display_bytes = 0
        self.loop_: object | None = None
        self.proc_fds = [_open("/proc/self/clear_refs", os.O_WRONLY), _open("/proc/self/status", os.O_RDONLY)]

    def loop(self) -> None:
        while (request := read_frame(self.cmd)) is not None:
            self.last_seq = request.get("seq")
            if request.get("op") == "exec":
                reply = self.run(request["code"])
            elif request.get("op") == "slate":  # for a recycle: what the next episode would inherit
                reply = {"environ": dict(os.environ), "path": list(sys.path), "variables": self.variables()}
            else:
                reply = {"variables": self.variables()}
            write_frame(self.res, {**reply, "seq": self.last_seq})

    def run(self, code: str) -> dict[str, Any]:
        self.count += 1
        self.displays, self.display_bytes = [], 0
        filename = f"<cell-{self.count}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self.reset_peak()
        before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        exception, exit_code = None, 1
        try:
            tree = ast.parse(code, filename)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            if tree.body:
                self._run(compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True))
            if last is not None:
                self._run(compile(ast.Interactive([last]), filename, "single",
                                  flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True))
        except SystemExit as exc:  # `sys.exit(n)` ends the step, not the episode: its code is n
            exit_code = exit_status(exc.code, announce=False)  # the traceback below says it
            exception = self.describe(exc) if exit_code else None
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt is a result too
            exception = self.describe(exc)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - the code may have replaced or closed them
                pass
        if os.getpid() != self.pid:  # a child forked by the cell finished it: it is not the worker
            os._exit(exception is not None)
        after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
        return {"status": "error" if exception else "ok", "exception": exception, "exit_code": exit_code,
                "displays": self.displays, "cpu_time_s": round(cpu, 6), "peak_memory_mb": self.peak_mb(),
                "snapshot": self.snapshot()}

    def snapshot(self) -> str | None:
        """The namespace's variables after the step, listed without running its code (`inside/snapshot.py`)."""
        try:
            return encoded(self.ns)
        except BaseException:  # noqa: BLE001 - a recursion limit, say: none this time
            return None

    def reset_peak(self) -> None:
        """Restart the kernel's peak-RSS counter (VmHWM) so the peak is this step's."""
        fd = self.proc_fds[0]
        try:
            if fd is not None:
                os.write(fd, b"5")
        except OSError:
            pass

    def peak_mb(self) -> float | None:
        fd = self.proc_fds[1]
        try:
            if fd is None:
                return None
            status = os.pread(fd, 8192, 0)
            start = status.index(b"VmHWM:") + 6
            return round(int(status[start:status.index(b"kB", start)]) / 1024, 3)
        except (OSError, TypeError, ValueError):
            return None

    def _run(self, code: types.CodeType) -> None:
        result = eval(code, self.ns)
        if code.co_flags & 0x80:  # CO_COROUTINE: the cell used top-level await
            if self.loop_ is None:
                import asyncio

                self.loop_ = asyncio.new_event_loop()
            self.loop_.run_until_complete(result)  # type: ignore[attr-defined]

    def describe(self, exc: BaseException) -> dict[str, Any]:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in INTERNAL_FILES:
            tb = tb.tb_next
        try:
            text = "".join(traceback.format_exception(type(exc), exc, tb))
            message = str(exc)
        except BaseException:  # noqa: BLE001 - a user __str__ may raise anything
            text, message = f"{type(exc).__name__}: <unprintable>\n", "<unprintable>"
        try:
            sys.stderr.write(text)
        except Exception:  # noqa: BLE001, S110 - the code may have replaced stderr
            pass
        return {"type": type(exc).__name__, "message": clean(message), "traceback": clean(text)}

    def bundle(self, obj: object) -> dict[str, Any]:
        data: dict[str, Any] = {"text/plain": clean(repr(obj))}
        cls = type(obj)
        for method, mime in MIME_METHODS:
            fn = getattr(cls, method, None)  # on the class: no instance __getattr__ magic
            if not callable(fn) or isinstance(obj, type):
                continue
            try:
                value = fn(obj)
            except Exception:  # noqa: BLE001, S112 - a user _repr_*_ may raise anything
                continue
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode()
            if value is not None:
                data[mime] = value if isinstance(value, (str, dict, list)) else str(value)
        return data

    def add_display(self, kind: str, data: dict[str, Any]) -> None:
        size = len(json.dumps(data, default=str))
        if self.display_bytes + size > self.keep:
            sys.stderr.write(f"[sandbox-env] display output of {size} bytes dropped (over the limit)\n")
            return
        self.display_bytes += size
        self.displays.append({"kind": kind, "data": json.loads(json.dumps(data, default=str)),
                              "metadata": {}})

    def display(self, *objs: object, **_: object) -> None:
        """IPython's `display()`, reduced to MIME bundles."""
        for obj in objs:
            self.add_display("display_data", self.bundle(obj))

    def displayhook(self, value: object) -> None:
        if value is None:
            return
        self.ns["_"] = value
        data = self.bundle(value)
        sys.stdout.write(data["text/plain"] + "\n")
        if len(data) > 1:
            self.add_display("execute_result", data)

    def variables(self) -> dict[str, Any]:
        """Names, types and short reprs, without running any user-defined method."""
        found: dict[str, Any] = {}
        for name, value in list(self.ns.items()):
            cls = type(value)
            if name.startswith("_") or types.ModuleType in cls.__mro__ or len(found) >= 200:
                continue
            type_name = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
            try:
                if cls in PLAIN_TYPES:
                    short = repr(value[:100] if cls in (str, bytes) else value)[:100]
                elif cls in SIZED_TYPES:
                    short = f"<{cls.__name__} of {len(value)}>"
                else:
                    short = f"<{type_name}>"
            except ValueError:  # e.g. an int past the str-digits limit
                short = f"<{type_name}>"
            found[name] = {"type": clean(type_name), "repr": clean(short)}
        return found


class DisplayObject:
    """Minimal `IPython.display` objects for images without IPython (the real one wins if present)."""

    mime = "text/plain"

    def __init__(self, data: object = None, url: str | None = None, filename: str | None = None,
                 **_: object) -> None:
        if filename is not None:
            with open(filename, "rb" if self.binary else "r") as f:
                data = f.read()
        self.data, self.url = data, url

    binary = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} object>"


def _mime_class(name: str, method: str, binary: bool = False) -> type:
    return type(name, (DisplayObject,), {"binary": binary, method: lambda self: self.data})


HTML = _mime_class("HTML", "_repr_html_")
Markdown = _mime_class("Markdown", "_repr_markdown_")
SVG = _mime_class("SVG", "_repr_svg_")
Latex = _mime_class("Latex", "_repr_latex_")
JSON = _mime_class("JSON", "_repr_json_")


class Image(DisplayObject):
    binary = True

    def _repr_png_(self) -> bytes | None:
        return self.data if isinstance(self.data, bytes) and self.data[:4] == b"\x89PNG" else None

    def _repr_jpeg_(self) -> bytes | None:
        return self.data if isinstance(self.data, bytes) and self.data[:2] == b"\xff\xd8" else None


class IPythonShim:
    """Import hook of last resort: `IPython.display` maps onto the worker's `display()`."""

    @classmethod
    def find_spec(cls, name: str, path: object = None, target: object = None) -> object:
        if name not in ("IPython", "IPython.display"):
            return None
        import importlib.util

        return importlib.util.spec_from_loader(name, cls, is_package=name == "IPython")  # type: ignore[arg-type]

    @classmethod
    def create_module(cls, spec: object) -> None:
        return None

    @classmethod
    def exec_module(cls, module: types.ModuleType) -> None:
        names = {"display": builtins.display, "clear_output": lambda *a, **k: None,  # type: ignore[attr-defined]
                 "DisplayObject": DisplayObject, "HTML": HTML, "Markdown": Markdown, "SVG": SVG,
                 "Latex": Latex, "JSON": JSON, "Image": Image}
        if module.__name__ == "IPython":
            names = {"display": builtins.display, "get_ipython": lambda: None}  # type: ignore[attr-defined]
        module.__dict__.update(names)


def _open(path: str, flags: int) -> int | None:
    try:
        return os.open(path, flags)
    except OSError:
        return None
