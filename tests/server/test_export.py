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


def notebook_file(tmp_path: Path, cells: list[tuple[str, list[dict[str, Any]]]], metadata: Any,
                  cell_metadata: Any = None) -> Path:
    """A hand-made recording: (source, outputs) per cell, the notebook's `metadata.sandbox_env`."""
    path = tmp_path / "crafted.ipynb"
    made = [{"cell_type": "code", "id": f"c{i}", "execution_count": i + 1, "source": source, "outputs": outputs,
             "metadata": {} if cell_metadata is None else {"sandbox_env": cell_metadata}}
            for i, (source, outputs) in enumerate(cells)]
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "cells": made,
                                "metadata": {} if metadata is None else {"sandbox_env": metadata}}))
    return path


def test_replay_never_takes_the_backend_from_the_notebook(tmp_path: Path) -> None:
    """A crafted notebook naming the in-process `fake` backend would run its cells on the host."""
    target = tmp_path / "written-on-the-host"
    path = notebook_file(tmp_path, [(f"open({str(target)!r}, 'w').write('pwned')\nprint('ran')",
                                     [{"output_type": "stream", "name": "stdout", "text": "ran\n"}])],
                         {"backend": "fake", "policy": "default"})
    env = {k: v for k, v in os.environ.items() if k != "SANDBOX_ENV_BACKEND"}
    ran = subprocess.run([sys.executable, "-m", "sandbox_env.cli", "replay", str(path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert not target.exists(), "the cell ran on the host"
    assert ran.returncode == 1 and "new error" in ran.stdout, ran.stdout + ran.stderr  # in the sandbox: no such path
    refused = replay(path, "--backend", "fake")
    assert refused.returncode == 2 and not target.exists(), refused.stdout + refused.stderr
    assert "refusing to replay: the fake backend is not a sandbox" in refused.stderr
    assert "--allow-unisolated" in refused.stderr and "Traceback" not in refused.stderr
    configured = subprocess.run([sys.executable, "-m", "sandbox_env.cli", "replay", str(path)], capture_output=True,
                                text=True, timeout=600, env={**env, "SANDBOX_ENV_BACKEND": "fake"})
    assert configured.returncode == 2 and "not a sandbox" in configured.stderr and not target.exists()
    trusted = replay(path, "--backend", "fake", "--allow-unisolated")  # the operator's explicit opt-out, as serve's
    assert trusted.returncode == 0 and target.read_text() == "pwned", trusted.stdout + trusted.stderr


def test_replay_takes_an_explicit_policy_and_refuses_malformed_metadata(tmp_path: Path) -> None:
    cell = [("print(6 * 7)", [{"output_type": "stream", "name": "stdout", "text": "42\n"}])]
    strict = replay(notebook_file(tmp_path, cell, {"policy": "default"}), "--policy", "strict")
    assert strict.returncode == 0 and "1 cells: 1 same" in strict.stdout, strict.stdout + strict.stderr
    suggested = replay(notebook_file(tmp_path, cell, {"policy": "strict"}))  # a suggestion the server's check refuses
    assert suggested.returncode == 2 and "--policy" in suggested.stderr, suggested.stdout + suggested.stderr
    for metadata, cell_metadata in [({"backend": 123}, None), ({"policy": ["x"]}, None), ("notadict", None),
                                    ({}, "notadict"), ({}, {"step": "one"})]:
        out = replay(notebook_file(tmp_path, cell, metadata, cell_metadata))
        assert out.returncode == 2, (metadata, cell_metadata, out.stdout + out.stderr)
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
