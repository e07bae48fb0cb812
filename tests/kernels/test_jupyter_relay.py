"""Jupyter backend: the server never receives a kernel's zmq traffic itself.

A relay process of the kernel's own (`sandbox_env/kernels/jupyter/relay.py`), confined with it, takes
every message and forwards only those of a few frames and bounded size. A multipart message of many
big frames (libzmq assembles it whole in the receiving process, whatever MAXMSGSIZE says) costs the
episode its kernel, never the server its memory.
"""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
import zmq
from kernel_helpers import KernelFactory

from sandbox_env.kernels.jupyter.kernel import JupyterKernel
from sandbox_env.kernels.jupyter.steps import POLL_S
from sandbox_env.models import ExecStatus

MB = 1 << 20
SEND = ("k = get_ipython().kernel; b = b'A' * {size}\n"
        "for i in range({times}):\n"
        "    k.session.send(k.iopub_socket, 'stream', {{'name': 'stdout', 'text': 'hi'}}, "
        "parent=k.get_parent(), buffers=[b] * {frames})\n")


@pytest.fixture
def backend() -> str:
    return "jupyter"


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")


async def _lost(kernel: JupyterKernel, code: str) -> None:
    await kernel.execute("kept = 1")
    result = await kernel.execute(code)
    assert result.status is ExecStatus.KILLED, (result.status, result.stderr[-500:])
    assert result.exit_code == 137
    assert "broke the message protocol" in result.stderr
    assert kernel.is_alive()
    lost = await kernel.execute("print(kept)")  # a fresh kernel
    assert lost.exception is not None and lost.exception.type == "NameError"
    assert (await kernel.execute("print('fresh')")).stdout == "fresh\n"


@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroups", "rlimits"])
async def test_many_big_frames_cost_the_kernel_not_the_server(make_kernel: KernelFactory, cgroups: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The red team's reproducer, smaller: 2 messages of 50 frames of 4 MB (each frame under the
    per-frame bound). The server (this process) does not grow; the step is a lost kernel."""
    monkeypatch.setattr(JupyterKernel, "use_cgroups", cgroups)
    kernel = await make_kernel(memory_mb=1024, timeout_s=60)
    await kernel.execute("print(1)")
    rss0 = _status("VmRSS:")
    _reset_peak()
    await _lost(kernel, SEND.format(size=4_000_000, times=2, frames=50))  # type: ignore[arg-type]
    grown = _status("VmHWM:") - rss0
    assert grown < 100 * MB, f"the server grew by {grown / MB:.0f} MB"


async def test_too_many_frames_cost_the_kernel(make_kernel: KernelFactory) -> None:
    """Small frames, but more than a Jupyter message has (no `buffers` are taken)."""
    await _lost(await make_kernel(timeout_s=60), SEND.format(size=10, times=1, frames=20))  # type: ignore[arg-type]


async def test_one_frame_over_the_bound_costs_the_kernel(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=60)
    rss0 = _status("VmRSS:")
    _reset_peak()
    await _lost(kernel, SEND.format(size=5 * MB, times=1, frames=1))  # type: ignore[arg-type]
    assert _status("VmHWM:") - rss0 < 100 * MB


async def test_relay_is_in_the_kernel_confinement_and_the_server_only_talks_to_it(
        make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    assert isinstance(kernel, JupyterKernel)
    cur = kernel._cur
    assert cur is not None and cur.relay is not None and cur.kc is not None
    assert cur.relay.poll() is None
    if cur.conf.dirs:
        assert cur.relay.pid in cur.conf.pids()
    kernel_dir = str(kernel.root / f"k{cur.generation}") if kernel._layout is not None else cur.km.ip
    for channel in (cur.kc.shell_channel, cur.kc.iopub_channel):
        url = channel.socket.last_endpoint.decode()
        assert url.startswith(f"ipc://{kernel.root}/r{cur.generation}/"), url
        assert kernel_dir not in url
    # a killed relay is a lost kernel for the next step
    cur.relay.kill()
    cur.relay.wait()
    assert not kernel.is_alive()
    result = await kernel.execute("print('after')")
    assert result.status is ExecStatus.OK and "after\n" in result.stdout


async def test_steps_displays_inspect_and_interrupts_pass_the_relay(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=2, memory_mb=512)
    result = await kernel.execute("x = 41\nprint(x + 1)")
    assert (result.status, result.stdout) == (ExecStatus.OK, "42\n")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8  # a display of 2 kB
    result = await kernel.execute(f"from IPython.display import Image, display\ndisplay(Image(data={png!r}))")
    assert result.status is ExecStatus.OK, result.stderr
    pngs = [d for d in result.displays if "image/png" in d.data]
    assert pngs and base64.b64decode(pngs[0].data["image/png"]) == png
    info = await kernel.inspect()
    assert any(v["name"] == "x" and v["repr"] == "41" for v in info["variables"]), info
    result = await kernel.execute("import time\ntime.sleep(30)")  # interrupted over the control channel
    assert result.status is ExecStatus.TIMEOUT
    assert (await kernel.execute("print(x)")).stdout == "41\n"  # the interrupt kept the kernel


# Messages cheap to send but slow or big to parse: the relay parses them first, in the episode.
DATES = ("k = get_ipython().kernel; h = k.session.msg_header('status')\n"
         "h['pad'] = ['2020-01-01T00:00:00'] * 150_000\n"  # 3.8 MB: dateutil on each, 3 s in the server
         "k.session.send(k.iopub_socket, 'status', {'execution_state': 'busy'}, parent=k.get_parent(), header=h)\n")
EXPANDS = ("k = get_ipython().kernel\nbody = b'{{\"a\":[' + b'{{}},' * {n} + b'{{}}]}}'\n"  # 30x as Python objects
           "k.session.send(k.iopub_socket, 'status', body, parent={{}})\n")  # nobody's: dropped


async def test_a_header_slow_to_parse_costs_the_kernel(make_kernel: KernelFactory) -> None:
    """jupyter_client parses every date-like string of a header with dateutil, on the server's
    event loop: headers must be small flat objects; a kernel sending another one is lost."""
    await _lost(await make_kernel(timeout_s=60), DATES)


@pytest.mark.parametrize("n", [1_000_000, 2_400_000], ids=["3MB", "7MB"])
async def test_json_that_expands_costs_the_kernel_not_the_server(make_kernel: KernelFactory, n: int) -> None:
    """`{"a":[{},{},...]}`: 3 MB is over the node budget (under the size bound); 7 MB over the size
    bound, which no longer grows with the output limit. The server does not grow."""
    kernel = await make_kernel(timeout_s=60, memory_mb=1024, output_limit_bytes=8 * MB)
    rss0 = _status("VmRSS:")
    _reset_peak()
    await _lost(kernel, EXPANDS.format(n=n))
    grown = _status("VmHWM:") - rss0
    assert grown < 200 * MB, f"the server grew by {grown / MB:.0f} MB"


async def test_a_flood_between_steps_costs_neither_memory_nor_inspect(make_kernel: KernelFactory) -> None:
    """Big messages sent while no step runs queue at the server (the red team: 12 x 120 MB, +1 GB):
    now each is over the bound, and few are queued at all; inspect still answers."""
    kernel = await make_kernel(timeout_s=60, memory_mb=1024, output_limit_bytes=64 * MB)
    rss0 = _status("VmRSS:")
    _reset_peak()
    flood = ("import threading\nk = get_ipython().kernel\nbody = b'\"' + b'a' * (50 << 20) + b'\"'\n"
             "def go():\n    for i in range(10):\n        k.session.send(k.iopub_socket, 'status', body, parent={})\n"
             "threading.Thread(target=go, daemon=True).start()\n")
    await kernel.execute(flood)
    for _ in range(30):  # the kernel sends them all (or its relay gives up)
        await asyncio.sleep(0.1)
    info = await kernel.inspect()
    assert isinstance(info["variables"], list)
    grown = _status("VmHWM:") - rss0
    assert grown < 200 * MB, f"the server grew by {grown / MB:.0f} MB"
    assert (await kernel.execute("print('next')")).status is ExecStatus.OK


async def test_the_relay_runs_unprivileged(make_kernel: KernelFactory) -> None:
    """It parses the kernel's bytes: as the kernel's uid (as root), no capability, no_new_privs."""
    kernel = await make_kernel()
    assert isinstance(kernel, JupyterKernel)
    cur = kernel._cur
    assert cur is not None and cur.relay is not None
    with open(f"/proc/{cur.relay.pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    assert status["NoNewPrivs"].strip() == "1"
    assert int(status["CapEff"], 16) == 0
    if kernel._layout is not None:
        assert status["Uid"].split() == [str(kernel._layout.uid)] * 4
        assert status["Seccomp"].strip() == "2"
    if os.geteuid() == 0 and kernel._layout is not None:
        assert kernel._layout.uid != 0


async def test_connection_watches_stop_before_their_sockets_close(make_kernel: KernelFactory,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A step watches the server's shell and iopub sockets for a dropped connection (a libzmq
    monitor each, `process.disconnected`). libzmq sends a monitor's events from the context's one I/O
    thread, with a blocking send, until the socket is gone, which is after close() returns: the
    relay's end, sent to a watch already closed, blocked that thread for good, and every kernel of
    the server with it (each start then failed: "Kernel didn't respond in 30 seconds"). So the
    teardown stops each monitor before its socket, or its watch, closes."""
    kernel = await make_kernel()
    assert isinstance(kernel, JupyterKernel) and kernel._cur is not None
    assert (await kernel.execute(f"import time; time.sleep({3 * POLL_S})")).status is ExecStatus.OK
    kc = kernel._cur.kc
    assert kc is not None
    sockets = {"iopub": kc.iopub_channel.socket, "shell": kc.shell_channel.socket}
    watches = {name: sock._monitor_socket for name, sock in sockets.items()}
    assert all(watch is not None and not watch.closed for watch in watches.values()), watches
    names = {id(sock): name for name, sock in sockets.items()}
    names |= {id(watch): f"{name} watch" for name, watch in watches.items()}
    seen: list[str] = []
    close, disable_monitor = zmq.Socket.close, zmq.Socket.disable_monitor

    def spy_close(sock: zmq.Socket, linger: int | None = None) -> None:
        if id(sock) in names:
            seen.append(f"close {names[id(sock)]}")
        close(sock, linger)

    def spy_disable_monitor(sock: zmq.Socket) -> None:
        if id(sock) in names:
            seen.append(f"stop {names[id(sock)]} monitor")
        disable_monitor(sock)

    monkeypatch.setattr(zmq.Socket, "close", spy_close)
    monkeypatch.setattr(zmq.Socket, "disable_monitor", spy_disable_monitor)
    await kernel.close()
    for name in sockets:
        assert f"stop {name} monitor" in seen, seen
        assert f"close {name}" in seen and f"close {name} watch" in seen, seen
        stop = seen.index(f"stop {name} monitor")
        assert stop < seen.index(f"close {name}") and stop < seen.index(f"close {name} watch"), seen
