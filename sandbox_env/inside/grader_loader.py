"""The program each grading runs, with `procs` bundled in front of it (`grading.grader_program`).

It makes itself non-dumpable before it reads a byte, then reads the preamble (see
`grading.grader_preamble`): `wire`, the grader module (`grader.py`) and the child's CODEC and HOST,
compiled by the server when the bytecode magic matches (else compiled here from their sources).
It runs the grader and hands over to its boot(), which reads the job. Exact reads: no byte past a
section enters the process before boot() has forked the child.
"""

import marshal
import os
import sys
import types
import zlib

from sandbox_env.inside.procs import set_dumpable

HARDENED = set_dumpable(False)  # first: a dumpable grader could be read by the submission


def read(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise SystemExit("the grader's input ended early")
        data += chunk
    return data


def section():
    return read(int(read(12)))


def load():
    magic, codes, sources = marshal.loads(zlib.decompress(section()))
    if magic == sys.modules["_frozen_importlib_external"].MAGIC_NUMBER:
        wire, grader, codec_code, child_code = marshal.loads(codes)
    else:
        wire = compile(sources["wire"], "<sandbox_env.inside.wire>", "exec")
        grader = compile(sources["grader"], "<grader>", "exec")
        codec_code = compile(sources["codec"], "<codec>", "exec")
        child_code = compile(sources["codec"] + sources["host"], "<child>", "exec") if sources["host"] else None
    module = sys.modules["sandbox_env.inside.wire"] = types.ModuleType("sandbox_env.inside.wire")
    exec(wire, module.__dict__)
    namespace = {"__name__": "__grader__", "__builtins__": __builtins__, "CODEC": sources["codec"],
                 "HOST": sources["host"], "CODEC_CODE": codec_code, "CHILD_CODE": child_code,
                 "section": section, "HARDENED": HARDENED}
    exec(grader, namespace)
    namespace["boot"]()


load()
