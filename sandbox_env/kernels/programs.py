"""One program run to its end with bounded output: shared by the backends that start programs as
host processes (the Jupyter sandbox's `run_program`, and the fake's)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Protocol

from sandbox_env.inside.bounded import BoundedOutput
from sandbox_env.models import ExecStatus

DRAIN_S = 1.0  # how long a program's output is still read once it ended
EXIT_POLL_S = 0.005


class Feed(Protocol):
    """A program's stdin: an asyncio StreamWriter, or a forked program's pipe."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class Running(Protocol):
    """What `run_to_end` needs of a program: an asyncio subprocess, or a Jupyter program forked
    from its template (`kernels/jupyter/boxes.py`)."""

    @property
    def stdin(self) -> Feed | None: ...
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None

    @property
    def returncode(self) -> int | None: ...


@dataclasses.dataclass
class ProgramEnd:
    status: ExecStatus | None  # OUTPUT_LIMIT or TIMEOUT when it was stopped; None: it exited
    code: int  # its exit status (negative: the signal that ended it)
    out: BoundedOutput
    err: BoundedOutput


async def run_to_end(proc: Running, stdin: bytes, *, keep_stdout: int, keep_stderr: int,
                     limit: int, timeout_s: float, stop: Callable[[], Awaitable[object]],
                     exited: Awaitable[int] | None = None) -> ProgramEnd:
    """Feed `stdin`, read stdout and stderr until the program exits, its output passes `limit`
    bytes, or `timeout_s` passes; then `stop()` (kill whatever of it is left) and collect.
    `exited`: the program's exit status when it has one (default: `returncode`, polled)."""
    out, err = BoundedOutput(keep_stdout), BoundedOutput(keep_stderr)
    over = asyncio.Event()

    async def pump(stream: asyncio.StreamReader, sink: BoundedOutput) -> None:
        # Read to the end even past the limit: a pipe left full would keep the program (and, on
        # Python 3.11, asyncio's wait()) from ever finishing.
        while chunk := await stream.read(1 << 16):
            if not over.is_set():
                sink.write(chunk)
                if out.total + err.total > limit:
                    over.set()

    async def feed() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # the program may exit without reading
            proc.stdin.write(stdin)
            await proc.stdin.drain()
        proc.stdin.close()

    assert proc.stdout is not None and proc.stderr is not None
    tasks = [asyncio.ensure_future(c) for c in (feed(), pump(proc.stdout, out), pump(proc.stderr, err))]
    exited, overflow = asyncio.ensure_future(exited or _exit_status(proc)), asyncio.ensure_future(over.wait())
    try:
        finished, _ = await asyncio.wait({exited, overflow}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled: nothing of this run waits on its pipes or its status any more
        for task in (*tasks, exited, overflow):
            task.cancel()
        await asyncio.gather(*tasks, exited, overflow, return_exceptions=True)
        raise
    status = (ExecStatus.OUTPUT_LIMIT if overflow in finished else
              None if exited in finished else ExecStatus.TIMEOUT)
    await stop()
    code = await exited
    # The pipes end with the program; a process that escaped `stop` would keep them open: read
    # what came for a moment, then close our ends.
    await asyncio.wait(tasks, timeout=DRAIN_S)
    for task in (*tasks, overflow):
        task.cancel()
    await asyncio.gather(*tasks, overflow, return_exceptions=True)
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()
    return ProgramEnd(status, code, out, err)


async def _exit_status(proc: Running) -> int:
    """The program's exit status, as soon as it has one: on Python 3.11 `proc.wait()` also waits
    for its pipes to close, which a process it left behind may never let happen."""
    while proc.returncode is None:
        await asyncio.sleep(EXIT_POLL_S)
    return proc.returncode
