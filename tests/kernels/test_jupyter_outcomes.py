"""Jupyter backend: output metered inside the kernel, and whatever the kernel sends, a typed outcome.

Floods end as `output_limit` with exactly the first `output_limit_bytes` kept, whatever produces
them (print, `sys.stdout.buffer`, fd 1, a subprocess). Messages the episode's code forges on the
kernel's own iopub socket (malformed, oversized, out of protocol) cost it its kernel: the step
ends `killed`, the kernel is replaced, the server carries on.
"""

from __future__ import annotations

import pytest
from kernel_helpers import KernelFactory

from sandbox_env.models import ExecStatus

MIN_MESSAGE = 4 << 20  # jupyter.MIN_MESSAGE: the bound on a kernel's messages below 2 x the limit
LIMIT = 200_000
# Everything received is kept (output_bytes > LIMIT), so the kept text is the whole prefix.
FLOOD_POLICY = {"output_bytes": 300_000, "output_limit_bytes": LIMIT, "timeout_s": 30, "memory_mb": 256}

FLOODS = {
    "print": ("while True:\n    print('y' * 999)", "y" * 999 + "\n"),
    "stdout.buffer": ("import sys\nwhile True:\n    sys.stdout.buffer.write(b'b' * 1000)", "b" * 1000),
    "os.write(1)": ("import os\nwhile True:\n    os.write(1, b'w' * 1000)", "w" * 1000),
    "subprocess yes": ("import subprocess\nsubprocess.run(['yes'])", "y\n"),
    "one huge write": ("print('h' * 50_000_000)", "h" * LIMIT),
}


@pytest.fixture
def backend() -> str:
    return "jupyter"


@pytest.mark.parametrize(("code", "unit"), FLOODS.values(), ids=FLOODS.keys())
async def test_flood_cut_at_the_limit_in_the_kernel(make_kernel: KernelFactory, code: str, unit: str) -> None:
    kernel = await make_kernel(**FLOOD_POLICY)
    await kernel.execute("kept = 41")
    for _ in range(2):  # the meter counts each request from zero
        result = await kernel.execute(code)
        assert result.status is ExecStatus.OUTPUT_LIMIT, result.stderr[-500:]
        assert result.exit_code == 1
        assert result.stdout == (unit * (LIMIT // len(unit) + 1))[:LIMIT]  # exactly the first LIMIT bytes
        assert f"output exceeded {LIMIT} bytes" in result.stderr
        assert result.peak_memory_mb is None or result.peak_memory_mb < 200
    after = await kernel.execute("print(kept + 1)")  # interrupted, not killed: nothing leaks into the next step
    assert (after.status, after.stdout, after.stderr) == (ExecStatus.OK, "42\n", "")


async def test_flood_on_both_streams_shares_the_limit(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(**FLOOD_POLICY)
    result = await kernel.execute("import sys\nwhile True:\n    print('o' * 99)\n    print('e' * 99, file=sys.stderr)")
    assert result.status is ExecStatus.OUTPUT_LIMIT
    note = result.stderr.index("[sandbox-env]")
    assert len(result.stdout) + note == LIMIT
    assert set(result.stdout) == {"o", "\n"} and set(result.stderr[:note]) == {"e", "\n"}


async def test_rich_outputs_count(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(**FLOOD_POLICY)
    displays = await kernel.execute("from IPython.display import HTML, display\nwhile True:\n"
                                    "    display(HTML('d' * 10_000))")
    assert displays.status is ExecStatus.OUTPUT_LIMIT
    assert 0 < sum(len(d.data.get("text/html", "")) for d in displays.displays) <= LIMIT
    result = await kernel.execute("'r' * 50_000_000")  # one huge result: dropped in the kernel
    assert result.status is ExecStatus.OUTPUT_LIMIT and result.stdout == ""
    assert (await kernel.execute("print(len(_))")).stdout == "50000000\n"  # the kernel lived on



async def test_the_keys_of_a_rich_output_count_like_its_values(make_kernel: KernelFactory) -> None:
    """A bundle's MIME types are the kernel's to name: megabytes of key weigh what megabytes of
    value do, against what the observation keeps and against the hard limit."""
    kernel = await make_kernel(output_bytes=100_000, output_limit_bytes=20_000_000)
    result = await kernel.execute("from IPython.display import display\nfor i in range(6):\n"
                                  "    display({'k%d-' % i + 'K' * 1_000_000: '', 'text/plain': 'd%d' % i}, raw=True)")
    kept = sum(len(key) + len(str(value)) for d in result.displays for key, value in d.data.items())
    assert kept <= 100_000 and result.status is ExecStatus.OK, (kept, result.status)
    many = await kernel.execute("from IPython.display import display\n"
                                "display({f'type/{i}': 'x' for i in range(1000)}, raw=True)")
    assert many.status is ExecStatus.KILLED, many  # no honest display has a thousand representations

FORGE = (
    "import time\n"
    "kernel = get_ipython().kernel\n"
    "session = kernel.session\n"
    "send = lambda socket, m: type(session).send(session, socket, m)  # past the start-up code's meter\n"
    "msg = session.msg('stream', {{'name': 'stdout', 'text': 'forged'}}, parent=kernel.get_parent())\n"
    "{change}\n"
    "send(kernel.iopub_socket, msg)\n"
    "time.sleep(30)\n"
)
FORGERIES = {
    "content not an object": "msg['content'] = b'[1, 2]'",
    "content not JSON": "msg['content'] = b'\\xff not json'",
    "no message type": "del msg['header']['msg_type']",
    "parent header not an object": "msg['parent_header'] = 'bogus'",
    "parent id not a string": "msg['parent_header']['msg_id'] = 12",
    "stream text not a string": "msg['content']['text'] = 42",
    "stream of no known name": "msg['content']['name'] = 'stdin'",
    "error of the wrong shape": "msg = session.msg('error', {'ename': 1, 'evalue': None, 'traceback': 'x'}, "
                                "parent=kernel.get_parent())",
    "display nested too deep": "msg = session.msg('display_data', {'data': {'application/json': eval('[' * 90 + "
                               "']' * 90)}, 'metadata': {}}, parent=kernel.get_parent())",
    "note with an exit code out of range": "msg = session.msg('sandbox_env', {'event': 'exit', 'code': 300}, "
                                           "parent=kernel.get_parent())",
    "idle while still running": "msg = session.msg('status', {'execution_state': 'idle'}, parent=kernel.get_parent())",
    "bad signature": "send = lambda socket, m: socket.send_multipart("
                     "[p if i != 2 else b'0' * 64 for i, p in enumerate(session.serialize(m))])",
    "over the size bound": f"msg['content']['text'] = 'x' * {MIN_MESSAGE + 1024}",
}


@pytest.mark.parametrize("change", FORGERIES.values(), ids=FORGERIES.keys())
async def test_forged_message_costs_the_kernel(make_kernel: KernelFactory, change: str) -> None:
    kernel = await make_kernel(output_limit_bytes=1_000_000, timeout_s=120)
    await kernel.execute("kept = 1")
    result = await kernel.execute(FORGE.format(change=change))
    assert result.status is ExecStatus.KILLED, (result.status, result.stderr[-500:])
    assert result.exit_code == 137
    assert "broke the message protocol" in result.stderr
    assert kernel.is_alive()
    lost = await kernel.execute("print(kept)")  # a fresh kernel
    assert lost.exception is not None and lost.exception.type == "NameError"
    assert (await kernel.execute("print('fresh')")).stdout == "fresh\n"


async def test_big_forged_message_under_the_bound_is_only_output(make_kernel: KernelFactory) -> None:
    """Under the size bound a forged stream is output like any other: counted, kept bounded."""
    kernel = await make_kernel(output_bytes=10_000, output_limit_bytes=1_000_000)
    change = f"msg['content']['text'] = 'x' * {MIN_MESSAGE - 100_000}"
    result = await kernel.execute(FORGE.format(change=change))
    assert result.status is ExecStatus.OUTPUT_LIMIT
    assert len(result.stdout.encode()) < 12_000
    assert (await kernel.execute("print('alive')")).stdout == "alive\n"


async def test_well_formed_forged_exit_note_only_describes_its_own_step(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=120)
    change = "msg = session.msg('sandbox_env', {'event': 'os_exit', 'code': 9}, parent=kernel.get_parent())"
    result = await kernel.execute(FORGE.format(change=change))
    assert (result.status, result.exit_code) == (ExecStatus.ERROR, 9)
    assert (await kernel.execute("print('next')")).stdout == "next\n"


async def test_inspect_survives_a_poisoned_namespace(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    await kernel.execute("x = 1\nimport json\njson.dumps = lambda rows: repr(rows) * 10")
    info = await kernel.inspect()
    assert info["variables"] == [{"name": "x", "type": "int", "repr": "1"}]  # the snapshot's encoder was bound at start
    assert (await kernel.execute("print(x)")).stdout == "1\n"


async def test_inspect_between_steps_never_stalls_iopub(make_kernel: KernelFactory) -> None:
    """The kernel's iopub waits for its reader rather than drop messages (XPUB_NODROP): the status
    messages of many inspections (a live web page) must not stall it between steps."""
    kernel = await make_kernel()
    await kernel.execute("x = 1")
    for _ in range(600):  # 1200 status messages: more than iopub's queues hold
        assert [v["name"] for v in (await kernel.inspect())["variables"]] == ["x"]
    assert (await kernel.execute("print(x)")).stdout == "1\n"


async def test_fd_output_belongs_to_its_step(make_kernel: KernelFactory) -> None:
    """What a step (or its subprocess) wrote to fd 1/2 before it ended is all in that step's output,
    never left for a thread to deliver after the step's reply."""
    kernel = await make_kernel()
    code = "import os, subprocess\n_ = os.write(1, b'fd\\n')\n_ = subprocess.run(['echo', 'child'])"
    for _ in range(100):
        result = await kernel.execute(code)
        assert (result.status, result.stdout) == (ExecStatus.OK, "fd\nchild\n")
