"""What the worker says about itself, checked by the supervisor before it goes on the channel.

The worker runs the episode's code, which can make it say anything: these fields can only be
lies about that episode, but they must not be able to break or stall whoever reads them (the
server, its web page, an RL loop). So each one has a type, a size and, for JSON data, a depth.
Anything else is dropped and said so in the step's stderr.
"""

from __future__ import annotations

import math

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_DISPLAYS = 64
MAX_DEPTH = 32  # a display's JSON data (application/json)
MAX_NODES = 20_000
MAX_VARIABLES = 200
SHORT = 200
DISPLAY_KINDS = ("display_data", "execute_result")


def plain_json(value: Any) -> bool:
    """JSON data (dicts with str keys, lists, str, numbers, bools, None), at most MAX_DEPTH deep
    and MAX_NODES values in all; walked without recursion."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            return False
        kind = type(item)
        if kind is dict:
            if not all(type(k) is str for k in item):
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif kind is list:
            stack.extend((v, depth + 1) for v in item)
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif kind not in (str, int, bool, type(None)):
            return False
    return True


def text(value: Any, limit: int) -> str | None:
    return value[:limit] if type(value) is str else None


def number(value: Any) -> float | None:
    if type(value) in (int, float) and math.isfinite(value) and value >= 0:
        return value
    return None


def exception(value: Any, keep: int) -> dict[str, str] | None:
    if value is None or type(value) is not dict:
        return None
    fields = {"type": text(value.get("type"), SHORT), "message": text(value.get("message"), keep),
              "traceback": text(value.get("traceback"), keep)}
    return fields if None not in fields.values() else None


def display(value: Any) -> dict[str, Any] | None:
    if type(value) is not dict or value.get("kind") not in DISPLAY_KINDS:
        return None
    data, metadata = value.get("data"), value.get("metadata") or {}
    if type(data) is not dict or type(metadata) is not dict or not plain_json(data) or not plain_json(metadata):
        return None
    return {"kind": value["kind"], "data": data, "metadata": metadata}


def step_fields(reply: dict[str, Any], keep: int) -> tuple[dict[str, Any], list[str]]:
    """(the fields to pass on, the names of those that were malformed and dropped)."""
    dropped = []
    fields: dict[str, Any] = {"exception": exception(reply.get("exception"), keep)}
    if reply.get("exception") is not None and fields["exception"] is None:
        dropped.append("exception")
    displays = reply.get("displays") or []
    checked = [display(d) for d in displays[:MAX_DISPLAYS]] if type(displays) is list else [None]
    fields["displays"] = [d for d in checked if d is not None]
    if len(fields["displays"]) != (len(displays) if type(displays) is list else 1):
        dropped.append("displays")
    for name in ("cpu_time_s", "peak_memory_mb"):
        fields[name] = number(reply.get(name))
        if reply.get(name) is not None and fields[name] is None:
            dropped.append(name)
    return fields, dropped


def variables(value: Any) -> dict[str, dict[str, str]]:
    """The namespace listing of `inspect`: at most MAX_VARIABLES names, short strings only."""
    if type(value) is not dict:
        return {}
    found = {}
    for name, row in list(value.items())[:MAX_VARIABLES]:
        if type(name) is str and type(row) is dict:
            kind, short = text(row.get("type"), SHORT), text(row.get("repr"), SHORT)
            if kind is not None and short is not None:
                found[name[:SHORT]] = {"type": kind, "repr": short}
    return found
