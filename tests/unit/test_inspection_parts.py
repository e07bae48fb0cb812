"""The parts of inspection that need no kernel: the snapshot code (run here on hostile values), the
server's parse of it, the live output buffer, ended episodes' records, the notebook export."""

from __future__ import annotations

import json
import random
import sys

import nbformat
import pytest

from sandbox_env.history import Records, weight
from sandbox_env.inside import snapshot
from sandbox_env.kernels.inspection import LiveOutput, parse_snapshot
from sandbox_env.notebook import cell_outputs, normalized, to_notebook, verdict


class Trap:
    calls: list[str] = []  # noqa: RUF012 - shared on purpose: every call is recorded

    def __repr__(self) -> str:
        Trap.calls.append("repr")
        return "trap"

    def __getattribute__(self, name: str) -> object:
        Trap.calls.append(name)
        return object.__getattribute__(self, name)


def test_a_snapshot_calls_nothing_of_the_values_and_changes_nothing() -> None:
    trap = Trap()
    namespace = {"trap": trap, "deep": [[[trap]]], "d": {trap: trap}, "s": {1, 2}, "text": "é" * 500,
                 "big": 10 ** 10_000, "_private": 1, "mod": sys, "f": test_a_snapshot_calls_nothing_of_the_values_and_changes_nothing}
    before, state = dict(namespace), random.getstate()
    rows = {row["name"]: row for row in snapshot.take(namespace)["variables"]}
    assert Trap.calls == [] and namespace == before and random.getstate() == state
    assert rows["trap"]["repr"] == f"<{__name__}.Trap>" and rows["deep"]["repr"] == "[[<list of 1>]]"
    assert rows["big"]["repr"] == "<int of 33220 bits>" and len(rows["text"]["repr"]) <= snapshot.REPR_CHARS + 3
    assert set(rows) == {"trap", "deep", "d", "s", "text", "big", "f"} and rows["f"]["repr"].startswith("<function ")
    many = snapshot.take({f"v{i}": "x" * 1000 for i in range(1000)})
    assert len(many["variables"]) <= snapshot.MAX_NAMES and many["total"] == 1000 and many["truncated"]
    assert len(snapshot.encoded({f"v{i}": "x" * 1000 for i in range(1000)})) <= snapshot.MAX_BYTES


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"variables": 3}', "x" * 70_000, None, 5,
                                  '{"variables": [{"name": 1, "type": "t", "repr": "r"}, "row"], "total": "many"}'])
def test_a_malformed_snapshot_is_none_or_empty(text: object) -> None:
    parsed = parse_snapshot(text)
    assert parsed is None or parsed["variables"] == []


def test_live_output_keeps_its_tail_and_says_what_was_skipped() -> None:
    live = LiveOutput(keep_bytes=10)
    live.write("stdout", "ignored: no step runs")
    live.begin()
    live.write("stdout", "abcdef")
    live.write("stderr", "ghijkl")
    items, offset, skipped = live.since(0)
    assert skipped and offset == 12 and "".join(i["text"] for i in items) == "ghijkl"  # whole chunks go
    assert live.since(9) == ([{"stream": "stderr", "text": "jkl"}], 12, False)
    live.write("stdout", "x" * 50)
    assert live.text() == {"stdout": "x" * 10, "stderr": ""}


def test_records_expire_and_stay_within_their_budget() -> None:
    now = [0.0]
    records = Records(ttl_s=60, budget_bytes=5000, clock=lambda: now[0])
    records.add({"episode_id": "a", "session_id": "s1", "owner": "t1", "history": []})
    records.add({"episode_id": None, "history": []})  # never reset: nothing to export
    assert records.find("a", "t1") and records.find("s1", None) and records.find("a", "t2") is None
    records.add({"episode_id": "big", "owner": "t1", "history": ["x" * 4000]})
    records.add({"episode_id": "big2", "owner": "t1", "history": ["x" * 4000]})
    assert records.find("big", None) is None and records.find("big2", None) and records.size <= 5000
    now[0] = 61
    assert records.find("big2", None) is None and len(records) == 0


def test_notebook_export_is_valid_and_compares_by_content() -> None:
    error = {"type": "ZeroDivisionError", "message": "division by zero", "traceback": "Traceback...\nZeroDivisionError: x"}
    history = [
        {"step": 1, "code": "print(1)", "result": {"status": "ok", "stdout": "1\n", "execution_count": 1}},
        {"step": 2, "code": "1/0", "result": {"status": "error", "stderr": error["traceback"] + "\n", "exception": error}},
        {"step": 3, "code": "show()", "result": {"status": "ok", "displays": [
            {"kind": "display_data", "data": {"image/png": "iVBOR", "text/plain": ["<Figure>"], "application/json": {"a": 1}}},
            {"kind": "execute_result", "data": {"text/html": 7}}]}},
    ]
    nb = to_notebook({"episode_id": "e", "backend": "jupyter", "history": history})
    nbformat.validate(nbformat.from_dict(json.loads(json.dumps(nb))))
    assert [o["output_type"] for o in nb["cells"][1]["outputs"]] == ["error"]  # the traceback is not repeated
    outputs = cell_outputs(history[0]["result"])
    assert verdict(outputs, [{"output_type": "execute_result", "data": {"text/plain": "1"}, "execution_count": 3}])[0] == "same"
    assert verdict(outputs, [{"output_type": "stream", "name": "stdout", "text": "2\n"}]) == ("differs", ["stdout"])
    assert verdict(outputs, [{"output_type": "error", "ename": "E", "evalue": "", "traceback": []}])[0] == "new error"
    assert normalized(nb["cells"][2]["outputs"])["displays"][0].keys() == {"application/json", "image/png", "text/plain"}


def _ended(episode_id: str, owner: str, stdout: str) -> dict[str, object]:
    """An ended episode's record, shaped as `Episode.record()` makes it."""
    return {"episode_id": episode_id, "session_id": f"s-{episode_id}", "owner": owner, "backend": "jupyter",
            "policy": "default", "history": [{"step": 1, "code": "print(x)", "result": {"status": "ok", "stdout": stdout}}]}


def test_one_tenants_records_never_evict_anothers() -> None:
    records = Records(ttl_s=900, budget_bytes=4 << 20)
    records.add(_ended("alice-ep", "alice", "small\n"))
    for i in range(6):
        records.add(_ended(f"bob-{i}", "bob", "x" * (1 << 20)))
    assert records.find("alice-ep", "alice") is not None, "bob's episodes evicted alice's"
    assert records.find("bob-5", "bob") and records.find("bob-0", "bob") is None and records.size <= 4 << 20


def test_records_weigh_text_in_utf8_bytes() -> None:
    assert weight("é" * 1000) >= 2000 and weight("€" * 1000) >= 3000 and weight({"ключ": "x"}) >= 8 + 3
    records = Records(ttl_s=900, budget_bytes=4 << 20)
    records.add(_ended("wide", "alice", "€" * (2 << 20)))  # 2 Mi characters, 6 MiB of UTF-8: over the budget
    assert records.find("wide", "alice") is None and records.size == 0
