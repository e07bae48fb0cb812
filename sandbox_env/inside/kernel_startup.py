"""What a Jupyter kernel runs once at start (`kernels/output.py: kernel_shim` ships it as a bundle).

Standard library only: ipykernel's objects are reached at run time (the shell, `type(sys.stdout)`),
never imported.

* Output is metered where it is produced. Every byte written to sys.stdout/sys.stderr (text, the
  `.buffer` adapter, fd 1/2, which are pipes read into the same streams) and every rich output
  counts against the policy's limit. Past it, the rest of the request's output is dropped and the
  server is told (an `output_limit` note) and interrupts the cell. The kernel never holds more
  than a chunk of unsent output, whatever ipykernel's version or flush timing.
* Exits are reported: `SystemExit(n)` ends the cell with status n (the kernel lives on), and
  `os._exit(n)` first sends what was written, then tells the server n and waits to be killed, so
  nothing flushed before it is lost.

* The namespace is listed after every request (`inside/snapshot.py`: no code of the episode runs)
  and sent as a `snapshot` note: inspection reads the server's copy, never asks the kernel.

Notes travel on iopub as messages of type `NOTE`, parented to the current request. The episode's
code can forge them; they only ever describe its own step.
"""

from __future__ import annotations

import codecs
import operator
import os
import posix
import select
import signal
import sys
import threading
import time
import warnings

from sandbox_env.inside.procs import exit_status
from sandbox_env.inside.snapshot import encoded

NOTE = "sandbox_env"
CHUNK = 1 << 16  # characters a stream holds before they are sent
TEXT_CAP = 1 << 17  # characters of an exception's message and of its traceback
EXIT_WAIT_S = 10.0  # os._exit: the server kills the kernel once it has the note; else exit anyway
RICH = frozenset({"display_data", "update_display_data", "execute_result"})


class Meter:
    """Bytes of output of the current request against the limit, and the notes to the server."""

    def __init__(self, shell: object, limit: int) -> None:
        self.shell, self.limit = shell, limit
        self.kernel = shell.kernel  # type: ignore[attr-defined]
        self.session = self.kernel.session
        self.send = self.session.send  # unmetered, for the notes
        self.streams = (sys.stdout, sys.stderr)
        self.pid = os.getpid()
        self.used = 0
        self.tripped = self.told = self.in_cell = False
        self.pipes: list[tuple[object, int, object]] = []  # (stream, read end of its fd, decoder)
        self.lock = threading.RLock()  # held while pipe data is read and written: none in flight

    def pump(self, rounds: int = 64) -> None:
        """Into the streams, what fd 1/2 hold now (a stray child may write forever: `rounds`)."""
        with self.lock:
            for entry in list(self.pipes):
                stream, fid, decoder = entry
                for _ in range(rounds):
                    if not select.select([fid], [], [], 0)[0]:
                        break
                    data = os.read(fid, CHUNK)
                    if not data:  # the code closed fd 1/2 (and no child holds them)
                        self.pipes.remove(entry)
                        os.close(fid)
                        break
                    stream.write(decoder.decode(data))  # type: ignore[attr-defined]

    def pump_forever(self) -> None:
        while fids := [fid for _, fid, _ in self.pipes]:
            try:
                select.select(fids, [], [])
                self.pump(rounds=1)
            except Exception:  # noqa: BLE001, S110 - a stream the code broke: keep draining
                pass

    def start(self) -> None:
        self.used, self.tripped, self.told, self.in_cell = 0, False, False, True

    def stop(self, *_: object) -> None:
        self.in_cell = False
        try:
            self.pump()  # what the cell (or its subprocesses) wrote to fd 1/2 is its own output
        except Exception:  # noqa: BLE001, S110 - a stream the code broke
            pass
        try:  # the cell is over: an interrupt meant for it must not hit ipykernel's reply
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # ipykernel sets its own for the next request
        except ValueError:  # not the main thread
            pass

    def take(self, size: int) -> int:
        """How many of `size` bytes may go out."""
        room = self.limit - self.used
        self.used += size
        if size <= room:
            return size
        self.tripped = True
        return max(0, room)

    def over(self, parent: object) -> None:
        """After the last bytes allowed were written: tell the server, once."""
        if not self.told:
            self.told = True
            self.flush(drain=False)  # what was allowed goes before the note
            self.note(parent, event="output_limit")

    def note(self, parent: object, **content: object) -> None:
        self.send(self.kernel.iopub_socket, NOTE, content, parent=parent or {}, ident=NOTE.encode())

    def flush(self, drain: bool = True) -> None:
        """Hand what the streams hold (and what fd 1/2 still have in their pipes) to iopub."""
        try:
            if drain:
                self.pump()
            for stream in self.streams:
                stream.flush()  # type: ignore[attr-defined]
        except (OSError, ValueError):
            pass


def meter_streams(meter: Meter, cls: type) -> None:
    """Patch ipykernel's OutStream class: metered writes, sent every CHUNK characters."""
    write = cls.write

    def metered_write(self: object, text: str) -> int:
        if type(text) is not str:
            return write(self, text)  # ipykernel's TypeError
        n = len(text)
        size = n if text.isascii() else len(text.encode("utf-8", "replace"))
        if n < CHUNK and meter.used + size <= meter.limit:  # the common case: a small write
            meter.used += size
            write(self, text)
            pending = self._sbx_pending + n  # type: ignore[attr-defined]
            if pending >= CHUNK:
                pending = 0
                self.flush()  # type: ignore[attr-defined]
            self._sbx_pending = pending  # type: ignore[attr-defined]
            return n
        allowed = meter.take(size)
        if allowed < size:
            text = text[:allowed].encode("utf-8", "replace")[:allowed].decode("utf-8", "ignore")
        for start in range(0, len(text), CHUNK):
            write(self, text[start:start + CHUNK])
            self.flush()  # type: ignore[attr-defined]
        self._sbx_pending = 0  # type: ignore[attr-defined]
        if meter.tripped:
            meter.over(self.parent_header)  # type: ignore[attr-defined]
        return n

    def fileno(self: object) -> int:
        """fd 1/2 (the pipe ipykernel reads), not ipykernel's copy of the original stdout: what a
        subprocess given `stdout=sys.stdout` prints is captured and metered too."""
        fd = getattr(self, "_original_stdstream_fd", None)
        return fd if getattr(self, "_fid", None) is not None and fd is not None else original_fileno(self)

    original_fileno = cls.fileno
    cls.write, cls.fileno, cls._sbx_pending = metered_write, fileno, 0
    cls.buffer = property(ByteStream.of)


def capture_fds(meter: Meter) -> None:
    """fd 1/2 become pipes of ours, read by one thread under `meter.lock`, so the end of a cell
    takes all that was written before it (ipykernel's own reader may still hold a chunk when the
    cell's output is flushed, and it echoes all of it to the kernel's log)."""
    for stream in meter.streams:
        fd = getattr(stream, "_original_stdstream_fd", None)
        if getattr(stream, "_fid", None) is None or not isinstance(fd, int):
            continue
        stream._should_watch = False  # type: ignore[attr-defined]  # ipykernel's reader: stop after
        os.write(fd, b"\0")  # this byte, unwritten (its close() would otherwise wait for it forever)
        read, write = os.pipe()
        os.dup2(write, fd)  # inheritable: subprocesses write here
        os.close(write)
        stream._fid = read  # type: ignore[attr-defined]
        meter.pipes.append((stream, read, codecs.getincrementaldecoder("utf-8")("replace")))
    if meter.pipes:
        threading.Thread(target=meter.pump_forever, name="sandbox-env-fds", daemon=True).start()


class ByteStream:
    """`sys.stdout.buffer`, which ipykernel's streams lack: bytes decoded as UTF-8, errors replaced."""

    def __init__(self, stream: object) -> None:
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    @staticmethod
    def of(stream: object) -> ByteStream:
        found = stream.__dict__.get("_sbx_buffer")
        if found is None:
            found = stream.__dict__["_sbx_buffer"] = ByteStream(stream)
        return found  # type: ignore[no-any-return]

    def write(self, data: bytes) -> int:
        raw = memoryview(data).tobytes()
        self.stream.write(self.decoder.decode(raw))  # type: ignore[attr-defined]
        return len(raw)

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()  # type: ignore[attr-defined]

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False


def meter_rich(meter: Meter) -> None:
    """Displays and results count too: one over the limit is dropped, and the server told."""
    send = meter.send

    def metered_send(stream: object, msg_or_type: object, content: object = None, parent: object = None,
                     *args: object, **kwargs: object) -> object:
        kind = msg_or_type if isinstance(msg_or_type, str) else msg_or_type.get("msg_type")  # type: ignore[attr-defined]
        if kind in RICH:
            body = content if isinstance(msg_or_type, str) else msg_or_type.get("content")  # type: ignore[attr-defined]
            size = weight(body, meter.limit)
            if meter.take(size) < size:
                meter.over(parent if parent is not None else msg_or_type.get("parent_header"))  # type: ignore[attr-defined]
                return None
        return send(stream, msg_or_type, content, parent, *args, **kwargs)

    meter.session.send = metered_send


def weight(value: object, limit: int, depth: int = 0) -> int:
    """About the bytes `value` takes as JSON, without encoding it (it may be huge). Nested deeper
    than the server accepts (32), it weighs more than the limit: it is dropped here."""
    if isinstance(value, str):
        return len(value)
    if depth > 32:
        return limit + 1
    if isinstance(value, dict):
        return sum(len(str(key)) + weight(item, limit, depth + 1) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return sum(weight(item, limit, depth + 1) for item in value) + 2
    return 8


class Text:
    """An exception's message, already made a bounded str (ipykernel calls `str(evalue)`)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def cut(text: str, cap: int = TEXT_CAP) -> str:
    return text if len(text) <= cap else f"{text[:cap // 2]}\n... [cut] ...\n{text[-cap // 2:]}"


def report_errors(meter: Meter) -> None:
    """Bounded tracebacks; SystemExit(n) reported as the status n (0: no error at all)."""
    shell = meter.shell
    show = shell._showtraceback  # type: ignore[attr-defined]

    def bounded(etype: type, evalue: BaseException, stb: list[str]) -> object:
        if isinstance(etype, type) and issubclass(etype, SystemExit):
            code = exit_status(getattr(evalue, "code", None), announce=False)
            meter.note(shell.displayhook.parent_header, event="exit", code=code)  # type: ignore[attr-defined]
            if not code:
                shell._last_traceback = []  # type: ignore[attr-defined]
                return None
            stb = [line for line in stb if not line.startswith("An exception has occurred")]
        try:
            text = str(evalue)
        except BaseException:  # noqa: BLE001 - a user __str__ may raise anything
            text = "<unprintable>"
        whole = "\n".join(stb) if isinstance(stb, list) else str(stb)
        return show(etype, Text(cut(text)), stb if len(whole) <= TEXT_CAP else [cut(whole)])

    shell._showtraceback = bounded  # type: ignore[attr-defined]
    warnings.filterwarnings("ignore", message="To exit: use 'exit', 'quit', or Ctrl-D.")

    def exit(code: object = None) -> None:  # noqa: A001 - python's exit(), not IPython's "ask to exit"
        raise SystemExit(code)

    for name in ("exit", "quit"):
        shell.user_ns[name] = shell.user_ns_hidden[name] = exit  # type: ignore[attr-defined]


def report_os_exit(meter: Meter) -> None:
    """`os._exit(n)` in the kernel during a request: output sent first, then n told, then wait."""
    raw = posix._exit

    def _exit(status: int) -> None:
        code = operator.index(status)
        if os.getpid() == meter.pid and meter.in_cell:
            try:
                meter.flush()
                meter.note(meter.streams[0].parent_header, event="os_exit", code=code & 0xFF)  # type: ignore[attr-defined]
                meter.streams[0].flush()  # type: ignore[attr-defined]  # the note is handed to zmq
                deadline = time.monotonic() + EXIT_WAIT_S
                while time.monotonic() < deadline:
                    time.sleep(0.05)
            except BaseException:  # noqa: BLE001, S110 - exit whatever happens
                pass
        raw(code)

    _exit.__doc__ = raw.__doc__
    os._exit = posix._exit = _exit


def unblock_iopub(kernel: object) -> None:
    """iopub waits for a slow server instead of dropping messages (an `idle` among them)."""
    zmq = sys.modules.get("zmq")
    thread = getattr(kernel, "iopub_thread", None)
    socket = getattr(thread, "socket", None)
    if zmq is None or socket is None or not hasattr(zmq, "XPUB_NODROP"):
        return

    def nodrop() -> None:
        try:
            if socket.getsockopt(zmq.TYPE) == zmq.XPUB:
                socket.setsockopt(zmq.XPUB_NODROP, 1)
        except Exception:  # noqa: BLE001, S110 - an older libzmq: messages may drop, as before
            pass

    thread.schedule(nodrop)  # type: ignore[attr-defined]  # the socket belongs to iopub's thread


def report_snapshots(meter: Meter) -> None:
    """After each request: its namespace's variables (`snapshot.encoded`), as a note to the server."""
    shell = meter.shell
    namespace, hidden = shell.user_ns, shell.user_ns_hidden  # type: ignore[attr-defined]

    def send_snapshot() -> None:
        try:
            data = encoded(namespace, hidden)
        except BaseException:  # noqa: BLE001 - a recursion limit, say: no snapshot this time
            return
        try:
            meter.note(shell.displayhook.parent_header, event="snapshot", data=data)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001, S110 - the code broke the session: the server keeps the last one
            pass

    shell.events.register("post_execute", send_snapshot)  # type: ignore[attr-defined]


def install(shell: object, limit: int) -> None:
    meter = Meter(shell, limit)
    if type(meter.streams[0]).__name__ == "OutStream":  # ipykernel's; else the server's count only
        meter_streams(meter, type(meter.streams[0]))
        capture_fds(meter)
    meter_rich(meter)
    report_errors(meter)
    report_os_exit(meter)
    unblock_iopub(meter.kernel)
    shell.events.register("pre_execute", meter.start)  # type: ignore[attr-defined]
    shell.events.register("post_execute", meter.stop)  # type: ignore[attr-defined]
    report_snapshots(meter)
    for name in [n for n in sys.modules if n == "sandbox_env" or n.startswith("sandbox_env.")]:
        where = getattr(sys.modules[name], "__file__", None)
        if where is None or where.startswith("<"):  # the bundle's modules: the code may import its own
            del sys.modules[name]
