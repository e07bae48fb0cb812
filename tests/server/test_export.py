"""Export (an episode as .ipynb and JSONL) and replay (`sandbox-env replay`): a real server, real
kernels, nbformat's validator, nbclient through the replay command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest

from sandbox_env import SandboxEnv

PNG = "import base64\nfrom IPython.display import Image, display\ndisplay(Image(data=base64.b64decode({!r})))"
TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
# A deterministic episode: seeded randomness, state across steps, stderr, an error, a display.
STEPS = [
    "import random\nrandom.seed(1234)\ntotal = 0",
    *[f"total += random.randint(0, 1000)\nprint('step {i}', total)" for i in range(14)],
    "import sys\nprint('to stderr', file=sys.stderr)",
    "{'total': total, 'squares': [i * i for i in range(5)]}",
    "1 / 0",
    PNG.format(TINY_PNG),
    "print(sorted(random.sample(range(100), 5)))",
]


def replay(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox_env.cli", "replay", str(path), *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ})


async def record(server: Any, episode_id: str, steps: list[str]) -> None:
    async with SandboxEnv(server.url) as env:
        await env.reset(episode_id=episode_id, seed=7)
        for code in steps:
            await env.step(code)


async def test_export_is_a_valid_notebook_and_replays_the_same(live_server: Any, tmp_path: Path) -> None:
    assert len(STEPS) == 20
    await record(live_server, "export-me", STEPS)
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers) as http:
        reply = await http.get("/episodes/export-me/notebook")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/x-ipynb+json")
        assert 'filename="export-me.ipynb"' in reply.headers["content-disposition"]
        trace = await http.get("/episodes/export-me/trace")
    nb = nbformat.reads(reply.text, as_version=4)
    nbformat.validate(nb)  # raises on any schema error
    assert [c.source for c in nb.cells] == STEPS and all(c.cell_type == "code" for c in nb.cells)
    meta = nb.metadata["sandbox_env"]
    assert meta["backend"] == live_server.settings.backend and meta["policy"] == "default" and meta["seed"] == 7
    assert meta["limits"]["timeout_s"] > 0 and meta["step_count"] == 20 and meta["reset_at"] and meta["created_at"]
    assert "image" in meta and "task_id" in meta and nb.metadata["kernelspec"]["name"] == "python3"
    kinds = [[o.output_type for o in c.outputs] for c in nb.cells]
    assert kinds[1] == ["stream"] and kinds[15] == ["stream"] and nb.cells[15].outputs[0].name == "stderr"
    assert kinds[17] == ["error"] and nb.cells[17].outputs[0].ename == "ZeroDivisionError"
    assert nb.cells[17].outputs[0].traceback and nb.cells[17].metadata["sandbox_env"]["status"] == "error"
    assert kinds[18] == ["display_data"] and nb.cells[18].outputs[0].data["image/png"].strip() == TINY_PNG
    assert nb.cells[1].execution_count is not None and nb.cells[0].metadata["sandbox_env"]["wall_time_s"] > 0
    lines = [json.loads(line) for line in trace.text.splitlines()]
    assert lines[0]["type"] == "episode" and [ln["step"] for ln in lines[1:]] == list(range(1, 21))
    assert lines[18]["exception"]["type"] == "ZeroDivisionError" and lines[2]["stdout"].startswith("step 0 ")

    path = tmp_path / "episode.ipynb"
    path.write_text(reply.text)
    same = replay(path, "--output", str(tmp_path / "replayed.ipynb"))
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.count(": same") == 20 and "20 cells: 20 same, 0 differ, 0 new errors" in same.stdout
    nbformat.validate(nbformat.read(str(tmp_path / "replayed.ipynb"), as_version=4))

    changed = nbformat.reads(reply.text, as_version=4)
    changed.cells[3].outputs[0].text = "step 2 -1\n"  # a recorded output the replay will not reproduce
    changed.cells[15].source = "raise ValueError('new')"  # a cell that now fails (and changes no state)
    nbformat.write(changed, str(path))
    differs = replay(path)
    assert differs.returncode == 1, differs.stdout + differs.stderr
    assert "step 4: differs (stdout)" in differs.stdout and "step 16: new error (error: ValueError: new)" in differs.stdout
    assert "20 cells: 18 same, 1 differ, 1 new errors" in differs.stdout


async def test_an_ended_episode_stays_exportable_for_its_owner(live_server: Any, tmp_path: Path) -> None:
    await record(live_server, "ended", ["x = 1", "print(x)"])
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers) as http:
        assert (await http.get("/episodes/ended")).status_code == 404  # the session closed it
        nb = nbformat.reads((await http.get("/episodes/ended/notebook")).text, as_version=4)
        assert [c.source for c in nb.cells] == ["x = 1", "print(x)"] and nb.metadata["sandbox_env"]["closed_at"]
        assert (await http.get("/episodes/never/notebook")).status_code == 404
    async with httpx.AsyncClient(base_url=live_server.url) as anonymous:
        assert (await anonymous.get("/episodes/ended/notebook")).status_code == 401


def test_replay_refuses_what_is_not_a_notebook(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ipynb"
    bad.write_text('{"cells": 3}')
    out = replay(bad)
    assert out.returncode == 2 and "cannot read" in out.stderr


@pytest.mark.docker
def test_replay_on_docker(require_docker: None, tmp_path: Path) -> None:
    """A recording replays on the other backend: the export's outputs are the service's, not the backend's."""
    cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": i + 1, "source": source,
              "outputs": outputs} for i, (source, outputs) in enumerate([
                  ("x = 6 * 7", []),
                  ("print(x)", [{"output_type": "stream", "name": "stdout", "text": "42\n"}]),
                  ("x", [{"output_type": "stream", "name": "stdout", "text": "42\n"}]),
                  ("int('a')", [{"output_type": "error", "ename": "ValueError",
                                 "evalue": "invalid literal for int() with base 10: 'a'", "traceback": []}])])]
    path = tmp_path / "episode.ipynb"
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}))
    out = replay(path, "--backend", "docker")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 cells: 4 same" in out.stdout
