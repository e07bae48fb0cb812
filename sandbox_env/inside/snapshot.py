"""A namespace's variables, listed without running any of the episode's code. Stdlib only.

Both backends take a snapshot at the end of every step, inside the sandbox (Jupyter: an IPython
`post_execute` hook the kernel's start-up code registers; Docker: the worker, after each cell), and
send it with the step's messages. Inspection then reads what the server kept: looking at an
episode never sends its interpreter anything.

What is run on the values: only C code of builtin types. A value's type is `type(v)` (never
`v.__class__`, which a property can fake); its names come from `type`'s own descriptors (a
metaclass cannot override them here); lengths and reprs are taken only of values whose type IS a
builtin (`type(v) is list`, not `isinstance`: a subclass's `__len__`/`__repr__` is the episode's
code), containers are walked by this module, a few items deep, and anything else is shown as
`<module.Class>`. So no `__repr__`, `__getattr__`, `__len__`, `__sizeof__`, `__eq__` or descriptor
of the episode runs, nothing is assigned, imported or drawn from a random generator: the
namespace, `execution_count`, `_`/`Out` and the RNG state are as they were.

Every builtin, type and function this module calls is bound at import (the `_` names below), and
subclass tests scan the MRO by identity: an episode that replaces `builtins.repr`,
`types.ModuleType` (say, with a metaclass's `__subclasscheck__`) or `itertools.islice` gets none of
its code called by a snapshot.

The result is bounded (names, characters per field, bytes in all) and is the episode's to forge:
the server parses it again with its own bounds (`kernels/inspection.py: parse_snapshot`).
"""

from __future__ import annotations

import itertools
import json
import types

MAX_NAMES = 200  # variables listed (the rest counted)
NAME_CHARS = 100
REPR_CHARS = 160
ITEMS = 6  # items of a container shown in its repr
DEPTH = 2  # containers inside containers shown
MAX_BYTES = 48 << 10  # the whole snapshot as JSON
BIG_INT_BITS = 512  # larger ints are shown by their size (repr of a huge int is slow, or raises)

# Bound at import: the episode may later replace any builtin, `types.*` or `itertools.*` name.
_type, _id, _len, _repr, _iter, _list = type, id, len, repr, iter, list
_str, _int, _dict, _tuple, _Exception = str, int, dict, tuple, Exception
_dict_items = dict.items
_islice = itertools.islice
_ModuleType, _FunctionType = types.ModuleType, types.FunctionType
_QUALNAME = type.__dict__["__qualname__"].__get__
_MODULE = type.__dict__["__module__"].__get__
_MRO = type.__dict__["__mro__"].__get__  # type's own: a metaclass's `mro`/`__subclasscheck__` never runs
_FUNCTION_NAME = types.FunctionType.__dict__["__qualname__"].__get__
# By id: `cls in {int, ...}` would hash `cls`, and a metaclass's __hash__/__eq__ is the episode's code.
SCALARS = frozenset(map(id, (int, float, complex, bool, type(None), type(...), range)))
TEXTS = frozenset(map(id, (str, bytes, bytearray)))
SEQUENCES = frozenset(map(id, (list, tuple, set, frozenset)))
SIZED = TEXTS | SEQUENCES | {id(dict), id(range)}
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # bound at start: the code may patch json later


def _derives(cls: type, base: type) -> bool:
    """Whether `base` is in `cls`'s MRO, compared by identity (never `issubclass`)."""
    for entry in _MRO(cls):  # a tuple: iterating it runs no code
        if entry is base:
            return True
    return False


def type_name(cls: type) -> str:
    """`module.Qualname` (builtins: `Qualname`), read through `type`'s own descriptors."""
    try:
        name, module = _QUALNAME(cls), _MODULE(cls)
    except _Exception:  # noqa: BLE001 - a type without the usual fields
        return "?"
    name = name if _type(name) is _str else "?"
    if _type(module) is _str and module != "builtins":
        name = f"{module}.{name}"
    return name[:NAME_CHARS]


def safe_repr(value: object, depth: int = DEPTH, chars: int = REPR_CHARS) -> str:
    """A short repr built by this module: builtin values in full (cut), anything else by type."""
    cls = _type(value)
    try:
        if _id(cls) in TEXTS:
            text = _repr(value[:chars])  # type: ignore[index]
            return text if _len(value) <= chars else f"{text}…"  # type: ignore[arg-type]
        if cls is _int and value.bit_length() > BIG_INT_BITS:  # type: ignore[attr-defined]
            return f"<int of {value.bit_length()} bits>"  # type: ignore[attr-defined]
        if _id(cls) in SCALARS:
            return _repr(value)[:chars]
        if _id(cls) in SEQUENCES or cls is _dict:
            return _container(value, cls, depth, chars)
        if cls is _FunctionType:
            return f"<function {_FUNCTION_NAME(value)}>"[:chars]
        if _derives(cls, _type):  # a class: its name, through type's descriptors
            return f"<class {type_name(value)}>"  # type: ignore[arg-type]
    except _Exception:  # noqa: BLE001, S110 - builtin code raising (say, a recursion limit): by type
        pass
    return f"<{type_name(cls)}>"


def _container(value: object, cls: type, depth: int, chars: int) -> str:
    size = _len(value)  # type: ignore[arg-type]  # the exact builtin's C length
    if depth <= 0:
        return f"<{type_name(cls)} of {size}>"
    if cls is _dict:
        items = [f"{safe_repr(k, depth - 1, 40)}: {safe_repr(v, depth - 1, 60)}"
                 for k, v in _islice(_dict_items(value), ITEMS)]  # type: ignore[arg-type]
    else:
        items = [safe_repr(v, depth - 1, 60) for v in _islice(_iter(value), ITEMS)]  # type: ignore[call-overload]
    if size > ITEMS:
        items.append(f"… {size - ITEMS} more")
    if cls is _dict:
        text = "{" + ", ".join(items) + "}"
    elif cls is _list:
        text = "[" + ", ".join(items) + "]"
    elif cls is _tuple:
        text = "(" + ", ".join(items) + ("," if size == 1 else "") + ")"
    else:
        text = f"{type_name(cls)}({{{', '.join(items)}}})"
    return text if _len(text) <= chars else text[:chars - 1] + "…"


def describe(name: str, value: object) -> dict[str, object]:
    cls = _type(value)
    row: dict[str, object] = {"name": name[:NAME_CHARS], "type": type_name(cls), "repr": safe_repr(value)}
    if _id(cls) in SIZED:
        row["len"] = _len(value)  # type: ignore[arg-type]
    return row


def take(namespace: dict[str, object], hidden: object = ()) -> dict[str, object]:
    """The namespace's user variables: no `_` names, none of `hidden`, no modules."""
    rows: list[dict[str, object]] = []
    total, size = 0, 2
    for name, value in _list(_dict_items(namespace)):
        if _type(name) is not _str or name.startswith("_") or name in hidden:  # type: ignore[operator]
            continue
        if _derives(_type(value), _ModuleType):
            continue
        total += 1
        if _len(rows) >= MAX_NAMES or size > MAX_BYTES:
            continue
        row = describe(name, value)
        size += _len(_ENCODE(row)) + 1
        if size <= MAX_BYTES:
            rows.append(row)
    return {"variables": rows, "total": total, "truncated": total > _len(rows)}


def encoded(namespace: dict[str, object], hidden: object = ()) -> str:
    """`take` as JSON text (ASCII: it crosses the message protocol unchanged)."""
    return _ENCODE(take(namespace, hidden))
