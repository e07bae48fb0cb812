"""Unit tests of the bounded output buffer and of the Jupyter message collector (no kernel)."""

from __future__ import annotations

from sandbox_env.kernels.output import BoundedOutput, OutputCapture, StepCollector
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


def test_collector_maps_messages() -> None:
    step = StepCollector(keep_bytes=1000, hard_limit=10_000)
    assert not step.add(_msg("stream", name="stdout", text="out\n"))
    step.add(_msg("stream", name="stderr", text="err\n"))
    step.add(_msg("execute_result", data={"text/plain": "42"}, execution_count=3))
    step.add(_msg("display_data", data={"image/png": "iVBOR", "text/plain": "<Image>"}, metadata={}))
    step.add(_msg("error", ename="ValueError", evalue="bad", traceback=["\x1b[31mTraceback\x1b[0m", "ValueError: bad"]))
    assert step.add(_msg("status", execution_state="idle"))
    status = step.status_from({"content": {"status": "error", "execution_count": 3}})
    result = step.result(status=status, wall=0.1, exit_status=None, cpu=0.05, peak_mb=50.0)
    assert result.status is ExecStatus.ERROR and result.exit_code == 1
    assert result.stdout == "out\n42\n"
    assert result.stderr.startswith("err\n") and "ValueError: bad" in result.stderr
    assert result.exception is not None and result.exception.traceback == "Traceback\nValueError: bad"
    assert [d.kind for d in result.displays] == ["display_data"]
    assert result.execution_count == 3


def test_collector_killed_exit_codes() -> None:
    codes = []
    for exit_status in (3, -9, 0):
        step = StepCollector(keep_bytes=100, hard_limit=1000)
        codes.append(step.result(status=ExecStatus.KILLED, wall=0, exit_status=exit_status, cpu=None,
                                 peak_mb=None).exit_code)
    assert codes == [3, 137, 1]  # a dead interpreter never reports success


def test_collector_drops_displays_over_budget() -> None:
    step = StepCollector(keep_bytes=100, hard_limit=10_000)
    for _ in range(5):
        step.add(_msg("display_data", data={"image/png": "x" * 40}, metadata={}))
    result = step.result(status=ExecStatus.OK, wall=0, exit_status=None, cpu=None, peak_mb=None)
    assert len(result.displays) == 2
    assert "3 rich outputs dropped" in result.stderr
