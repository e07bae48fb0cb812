"""An episode as a Jupyter notebook (nbformat v4.5) or a JSONL trace, and notebook outputs compared
cell by cell for replay. Plain data in, plain data out: the standard library only (nbformat
validates the result in the tests; nothing here needs it).

One code cell per step, with its outputs: the stdout stream, the stderr stream (without the
traceback, which is the error output's), rich displays (`display_data`, `execute_result`), the
error with its traceback, and the step's execution count. A result's `text/plain` value is part of
stdout on this service (`ExecutionResult.stdout`), so it appears as a stream. The notebook's
metadata says where it ran (`metadata.sandbox_env`: backend, policy and its limits, image, task,
seed, timings); each cell's, how its step ended (status, exit code, wall and CPU time, peak memory).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from sandbox_env._version import __version__

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (sandbox-env)", "language": "python"}
STEP_KEYS = ("status", "exit_code", "wall_time_s", "cpu_time_s", "peak_memory_mb", "stdout_truncated",
             "stderr_truncated")
JSON_MIME_SUFFIX = "json"


def _mime_value(mime: str, value: Any) -> Any:
    """nbformat: JSON types keep any JSON value, every other type is text."""
    if mime.endswith(JSON_MIME_SUFFIX):
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)
    return json.dumps(value, default=str)


def cell_outputs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A step's result (`ExecutionResult` as JSON) as notebook outputs."""
    outputs: list[dict[str, Any]] = []
    exception = result.get("exception") or None
    stdout, stderr = result.get("stdout") or "", result.get("stderr") or ""
    tb = (exception or {}).get("traceback") or ""
    if tb and tb in stderr:  # written to stderr as it happened: the error output carries it
        at = stderr.rfind(tb)
        stderr = stderr[:at] + stderr[at + len(tb):].removeprefix("\n")
    if stdout:
        outputs.append({"output_type": "stream", "name": "stdout", "text": stdout})
    if stderr:
        outputs.append({"output_type": "stream", "name": "stderr", "text": stderr})
    for display in result.get("displays") or []:
        data = {str(k): _mime_value(str(k), v) for k, v in (display.get("data") or {}).items()}
        metadata = display.get("metadata") if isinstance(display.get("metadata"), dict) else {}
        if display.get("kind") == "execute_result":
            outputs.append({"output_type": "execute_result", "execution_count": result.get("execution_count"),
                            "data": data, "metadata": metadata})
        else:
            outputs.append({"output_type": "display_data", "data": data, "metadata": metadata})
    if exception:
        outputs.append({"output_type": "error", "ename": str(exception.get("type") or ""),
                        "evalue": str(exception.get("message") or ""), "traceback": tb.splitlines()})
    return outputs


def _meta(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("episode_id", "session_id", "backend", "policy", "limits", "image", "task_id", "seed", "created_at",
            "reset_at", "closed_at", "step_count", "history_complete")
    return {"version": __version__, **{k: record.get(k) for k in keys}}


def to_notebook(record: dict[str, Any]) -> dict[str, Any]:
    """The episode's record (`Episode.record()`) as an nbformat v4 notebook (a JSON object)."""
    cells = []
    for entry in record.get("history") or []:
        result = entry.get("result") or {}
        step = entry.get("step")
        cells.append({
            "cell_type": "code", "id": f"step-{step}",
            "metadata": {"sandbox_env": {"step": step, "started": entry.get("started"),
                                         "trimmed": bool(entry.get("trimmed")),
                                         **{k: result.get(k) for k in STEP_KEYS}}},
            "execution_count": result.get("execution_count"),
            "source": str(entry.get("code") or ""),
            "outputs": cell_outputs(result),
        })
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}, "sandbox_env": _meta(record)}}


def to_trace(record: dict[str, Any]) -> Iterator[str]:
    """The record as JSON lines: the episode first, then one line per step."""
    yield json.dumps({"type": "episode", **_meta(record)}, separators=(",", ":"), default=str)
    for entry in record.get("history") or []:
        result = entry.get("result") or {}
        line = {"type": "step", "episode_id": record.get("episode_id"), "step": entry.get("step"),
                "started": entry.get("started"), "code": entry.get("code"), **result}
        yield json.dumps(line, separators=(",", ":"), default=str)


# -- comparison of a cell's outputs (replay) ------------------------------------------------------

def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def normalized(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """What two runs of a cell must share to be the same: the text of each stream (a result's
    `text/plain` counted as stdout, as this service reports it), each rich display's content, the
    error's type and message. Not compared: tracebacks' paths, timings, execution counts."""
    out: dict[str, Any] = {"stdout": "", "stderr": "", "displays": [], "error": None}
    for item in outputs:
        kind = item.get("output_type")
        if kind == "stream":
            text = item.get("text", "")
            out["stderr" if item.get("name") == "stderr" else "stdout"] += "".join(text) if isinstance(text, list) else text
        elif kind in ("display_data", "execute_result"):
            data = {k: "".join(v) if isinstance(v, list) and not k.endswith(JSON_MIME_SUFFIX) else v
                    for k, v in (item.get("data") or {}).items()}
            if kind == "execute_result" and "text/plain" in data:
                out["stdout"] += data.pop("text/plain") + "\n"
                if not data:
                    continue
            out["displays"].append({k: _digest(v) for k, v in sorted(data.items())})
        elif kind == "error":
            out["error"] = [item.get("ename"), item.get("evalue")]
    return out


def verdict(recorded: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """("same" | "differs" | "new error", what differs)."""
    a, b = normalized(recorded), normalized(replayed)
    if a == b:
        return "same", []
    if b["error"] is not None and (a["error"] is None or a["error"][0] != b["error"][0]):
        return "new error", [f"error: {b['error'][0]}: {str(b['error'][1])[:200]}"]
    return "differs", [key for key in a if a[key] != b[key]]
