"""Unit tests of the bounded output buffer and of the Jupyter message collector (no kernel)."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox_env.kernels.output import (
    BoundedOutput,
    KernelAnomaly,
    OutputCapture,
    StepCollector,
    check_reply,
    died,
    kernel_shim,
)
from sandbox_env.models import ExecStatus


def test_small_output_kept_verbatim() -> None:
    buf = BoundedOutput(100)
    buf.write("hello ")
    buf.write(b"world")
    assert buf.getvalue() == "hello world"
    assert not buf.truncated and buf.total == 11


def test_head_and_tail_kept() -> None:
    buf = BoundedOutput(20)
    buf.write("HEAD-")
    for _ in range(1000):
        buf.write("x" * 97)
    buf.write("-TAIL")
    text = buf.getvalue()
    assert buf.truncated
    assert text.startswith("HEAD-") and text.endswith("-TAIL")
    assert f"[{buf.total - 20} bytes truncated]" in text
    assert buf.total == 10 + 97_000


def test_one_huge_write() -> None:
    buf = BoundedOutput(10)
    buf.write("a" * 5 + "b" * 1_000_000 + "c" * 5)
    assert buf.getvalue().startswith("aaaaa") and buf.getvalue().endswith("ccccc")


def test_invalid_and_split_utf8() -> None:
    buf = BoundedOutput(100)
    buf.write(b"ok \xff\xfe end")
    assert buf.getvalue() == "ok \ufffd\ufffd end"
    cut = BoundedOutput(8)
    cut.write("é" * 100)  # two bytes each: the cuts fall inside characters
    text = cut.getvalue()
    assert "\ufffd" not in text
    assert text.startswith("éé") and text.endswith("éé")


def test_capture_hard_limit_counts_both_streams() -> None:
    cap = OutputCapture(keep_bytes=10, hard_limit=100)
    cap.write("stdout", "x" * 60)
    assert not cap.over_limit
    cap.write("stderr", "y" * 60)
    assert cap.over_limit and cap.total == 120


def _msg(kind: str, **content: object) -> dict[str, object]:
    return {"msg_type": kind, "content": content, "parent_header": {}}


def _deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def test_collector_maps_messages() -> None:
    step = StepCollector(keep_bytes=1000, hard_limit=10_000)
    assert not step.add(_msg("stream", name="stdout", text="out\n"))
    step.add(_msg("stream", name="stderr", text="err\n"))
    step.add(_msg("execute_result", data={"text/plain": "42"}, execution_count=3))
    step.add(_msg("display_data", data={"image/png": "iVBOR", "text/plain": "<Image>"}, metadata={}))
    step.add(_msg("error", ename="ValueError", evalue="bad", traceback=["\x1b[31mTraceback\x1b[0m", "ValueError: bad"]))
    assert step.add(_msg("status", execution_state="idle"))
    status = step.status_from({"content": {"status": "error", "execution_count": 3}})
    result = step.result(status=status, wall=0.1, cpu=0.05, peak_mb=50.0)
    assert result.status is ExecStatus.ERROR and result.exit_code == 1
    assert result.stdout == "out\n42\n"
    assert result.stderr.startswith("err\n") and "ValueError: bad" in result.stderr
    assert result.exception is not None and result.exception.traceback == "Traceback\nValueError: bad"
    assert [d.kind for d in result.displays] == ["display_data"]
    assert result.execution_count == 3


def test_process_deaths() -> None:
    """A kernel that exits by itself reports its own status, as a program does; a signal kills."""
    assert [died(status) for status in (3, 0, -9, -11)] == [
        (ExecStatus.ERROR, 3), (ExecStatus.OK, 0), (ExecStatus.KILLED, 137), (ExecStatus.KILLED, 139)]


def test_collector_exit_notes() -> None:
    clean = StepCollector(keep_bytes=100, hard_limit=1000)
    assert not clean.add(_msg("sandbox_env", event="exit", code=0))
    assert clean.add(_msg("status", execution_state="idle"))
    status = clean.status_from({"content": {"status": "error"}})  # ipykernel calls any SystemExit an error
    assert (status, clean.result(status=status, wall=0, cpu=None, peak_mb=None).exit_code) == (ExecStatus.OK, 0)
    exiting = StepCollector(keep_bytes=100, hard_limit=1000)
    assert exiting.add(_msg("sandbox_env", event="os_exit", code=3))  # the process ends: so does the step
    status = exiting.status_from(None)
    assert (status, exiting.result(status=status, wall=0, cpu=None, peak_mb=None).exit_code) == (ExecStatus.ERROR, 3)
    cut = StepCollector(keep_bytes=100, hard_limit=1000)
    assert not cut.add(_msg("sandbox_env", event="output_limit")) and cut.over_limit


MALFORMED = {
    "not an object": ["stream"],
    "no type": {"msg_type": None, "content": {}, "parent_header": {}},
    "content not an object": {"msg_type": "stream", "content": [1, 2], "parent_header": {}},
    "parent not an object": {"msg_type": "stream", "content": {}, "parent_header": "bogus"},
    "parent id not a string": {"msg_type": "stream", "content": {}, "parent_header": {"msg_id": 7}},
    "stream text not a string": _msg("stream", name="stdout", text=42),
    "stream of another name": _msg("stream", name="stdin", text="x"),
    "error traceback not strings": _msg("error", ename="E", evalue="v", traceback=[1]),
    "unknown state": _msg("status", execution_state="dancing"),
    "display data not an object": _msg("display_data", data="x", metadata={}),
    "display nested too deep": _msg("display_data", data={"application/json": _deep(100)}, metadata={}),
    "exit code out of range": _msg("sandbox_env", event="exit", code=300),
    "unknown note": _msg("sandbox_env", event="reboot"),
    "huge field of a wrong type": _msg("stream", name="stdout", text=["x" * 1_000_000]),
}


@pytest.mark.parametrize("msg", MALFORMED.values(), ids=MALFORMED.keys())
def test_collector_malformed_message_ends_the_step(msg: Any) -> None:
    """Never an exception out of `add`: the step ends with an anomaly (the kernel is then replaced)."""
    step = StepCollector(keep_bytes=100, hard_limit=1000)
    assert step.add(msg) is True
    assert step.anomaly


def test_collector_other_requests_ignored_but_checked() -> None:
    step = StepCollector(keep_bytes=100, hard_limit=1000)
    other = {"msg_type": "stream", "content": {"name": "stdout", "text": "old"}, "parent_header": {"msg_id": "b"}}
    assert step.add(other, "a") is False and step.out.total == 0
    assert step.add({**other, "parent_header": None}, "a") is True and step.anomaly


def test_check_reply() -> None:
    def reply(**content: object) -> dict[str, object]:
        return {"msg_type": "execute_reply", "content": content, "parent_header": {"msg_id": "a"}}

    assert check_reply(reply(status="ok", execution_count=2), "a") is not None
    assert check_reply({**reply(status="ok"), "parent_header": {"msg_id": "b"}}, "a") is None
    for bad in (reply(), reply(status="ok", execution_count="2"), reply(status="ok", user_expressions=[]),
                {**reply(status="ok"), "msg_type": "kernel_info_reply"}, {**reply(status="ok"), "content": None}):
        with pytest.raises(KernelAnomaly):
            check_reply(bad, "a")


def test_kernel_shim_is_stdlib_source() -> None:
    shim = kernel_shim(12345)
    compile(shim, "<shim>", "exec")
    assert "install(get_ipython(), 12345)" in shim and "import ipykernel" not in shim


def test_collector_drops_displays_over_budget() -> None:
    step = StepCollector(keep_bytes=100, hard_limit=10_000)
    for _ in range(5):
        step.add(_msg("display_data", data={"image/png": "x" * 40}, metadata={}))
    result = step.result(status=ExecStatus.OK, wall=0, cpu=None, peak_mb=None)
    assert len(result.displays) == 2
    assert "3 rich outputs dropped" in result.stderr
