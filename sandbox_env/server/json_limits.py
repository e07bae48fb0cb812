"""What a request's JSON may cost the server: how many values (checked before parsing) and how
deep (checked after), and `load_bounded`, which applies both.

Parsing, walking and validating JSON runs on the event loop and holds the GIL (a worker thread
would not help), and its cost grows with the number of values, not the bytes: `[[],[],…]`
packs five million lists into 15 MB. So a text is refused before `json.loads` when it may hold
more than MAX_JSON_NODES values and keys. The bound is counted in C: commas, colons and opening
brackets are an upper bound on them; only when that rough count is over, strings (which may hold any
number of commas) are blanked out and the count is made again.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_NODES = 100_000  # far above a real request (a task with 10,000 stdio cases is ~50,000)
# Possessive and with an optional closing quote: a string is scanned once, even when it never
# ends (a backtracking pattern restarted at every escaped quote of an unterminated one: quadratic).
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_STRING_BYTES = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)


def _upper_bound(text: str | bytes) -> int:
    """Values and keys: each follows a comma, a colon or an opening bracket (the first one)."""
    if isinstance(text, str):
        return text.count(",") + text.count(":") + 2 * (text.count("[") + text.count("{")) + 1
    return text.count(b",") + text.count(b":") + 2 * (text.count(b"[") + text.count(b"{")) + 1


def json_cost_ok(text: str | bytes, limit: int = MAX_JSON_NODES) -> bool:
    """Whether `text` holds at most about `limit` JSON values (never fewer than it holds)."""
    if _upper_bound(text) <= limit:
        return True
    blanked = _STRING.sub('""', text) if isinstance(text, str) else _STRING_BYTES.sub(b'""', text)
    return _upper_bound(blanked) <= limit


MAX_JSON_DEPTH = 64  # nesting a request may carry (a deeper one is refused before any use)


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests at most `limit` containers deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


class NotJson(ValueError):
    """The text does not parse as JSON."""


class TooCostly(ValueError):
    """The text holds more JSON values, or nests deeper, than the server takes."""


def load_bounded(text: str | bytes) -> Any:
    """`json.loads`, after the value count and before use the depth: raises NotJson or TooCostly."""
    if not json_cost_ok(text):
        raise TooCostly(f"more than {MAX_JSON_NODES} JSON values")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the decoder's limit
        raise NotJson(str(exc)) from None
    if not json_depth_ok(value):
        raise TooCostly(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value
