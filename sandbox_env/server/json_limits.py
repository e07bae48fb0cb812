"""What a request's JSON may cost before the server parses it.

Parsing, walking and validating JSON runs on the event loop and holds the GIL (a worker thread
would not help), and its cost grows with the number of values, not the bytes: `[[],[],…]`
packs five million lists into 15 MB. So a text is refused before `json.loads` when it may hold
more than MAX_JSON_NODES values and keys. The bound is counted in C: commas, colons and opening
brackets are an upper bound on them; only when that rough count is over, strings (which may hold any
number of commas) are blanked out and the count is made again.
"""

from __future__ import annotations

import re

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
