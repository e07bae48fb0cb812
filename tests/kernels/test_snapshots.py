"""The snapshot channel is the episode's to forge: whatever it sends, the server keeps a bounded
snapshot (or none), and the step is unharmed. Real kernels of both backends."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandbox_env.kernels.inspection import FIELD_CHARS, SNAPSHOT_ROWS
from sandbox_env.models import ExecStatus


@pytest.fixture(params=["jupyter", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("require_docker")
    return str(request.param)


# Each backend's way to send its own snapshot for the step: a note on iopub (Jupyter), the
# worker's report (Docker). Rows far too many and far too long, and numbers out of range.
FORGED_ROWS = json.dumps({"variables": [{"name": "n" * 5000, "type": "t" * 5000, "repr": "r" * 5000, "len": -5}] * 5000,
                          "total": 10 ** 30})
FORGE = {
    "jupyter": ("k = get_ipython().kernel\n"
                "for data in [{forged!r}, 'not json', {{'nested': 1}}, '[' * 100000]:\n"
                "    k.session.send(k.iopub_socket, 'sandbox_env', {{'event': 'snapshot', 'data': data}},\n"
                "                   parent=get_ipython().displayhook.parent_header)\n"
                "for _ in range(50):\n"
                "    k.session.send(k.iopub_socket, 'sandbox_env', {{'event': 'snapshot', 'data': {small!r}}},\n"
                "                   parent=get_ipython().displayhook.parent_header)\n"),
    "docker": ("import sys\nw = sys.modules['sandbox_env.inside.worker'].Worker\n"
               "w.snapshot = lambda self: {forged!r}\n"),
}
SMALL = json.dumps({"variables": [{"name": "forged", "type": "int", "repr": "1"}], "total": 1})


async def test_a_forged_snapshot_is_bounded(make_kernel: Any, backend: str) -> None:
    kernel = await make_kernel()
    assert (await kernel.execute("x = 1")).status is ExecStatus.OK
    assert kernel.snapshot == {"variables": [{"name": "x", "type": "int", "repr": "1"}], "total": 1, "truncated": False}
    result = await kernel.execute(FORGE[backend].format(forged=FORGED_ROWS[:60_000] + "]}", small=SMALL))
    assert result.status is ExecStatus.OK, result.stderr
    snapshot = kernel.snapshot
    if backend == "jupyter":  # only the step's last note counts: the real one, sent after the cell
        assert [row["name"] for row in snapshot["variables"]] == ["x", "k", "data"], snapshot
    else:  # the forged report is malformed JSON after the cut: none is kept
        assert snapshot is None
    if snapshot is not None:
        assert len(snapshot["variables"]) <= SNAPSHOT_ROWS and snapshot["total"] < 1 << 31
        assert all(len(v) <= FIELD_CHARS for row in snapshot["variables"] for v in row.values() if isinstance(v, str))
        assert all(row.get("len", 0) >= 0 for row in snapshot["variables"])
    assert (await kernel.execute("print(x)")).stdout == "1\n"
    if backend == "docker":  # a well-formed forgery within the supervisor's 64 KiB: parsed, bounded
        rows = json.dumps({"variables": [{"name": "n" * 5000, "type": "t", "repr": "r"}] * 10, "total": -1})
        await kernel.execute(f"w.snapshot = lambda self: {rows!r}")
        rows = kernel.snapshot["variables"]
        assert len(rows) == 10 and all(len(row["name"]) == FIELD_CHARS for row in rows)
        assert kernel.snapshot["total"] == 10
