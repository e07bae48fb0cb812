"""Code that runs inside a sandbox, and nothing else.

Every module here imports only the standard library (import-linter and `tests/unit/test_inside.py`
enforce it): it is shipped into containers and kernels as source text, never installed there, and
it runs beside hostile code. The server reads these files as text (`source`, `bundle`); it never
runs the sandbox's side of them itself.

- `wire`: framing, and the authenticated channel between the server and the Docker supervisor.
- `bounded`: the head-and-tail output buffer (the server's capture uses it too).
- `procs`: the dumpable switch.
- `bundle`: turns several of these modules into one program text.
- `runner`, `worker`, `zygote`: the Docker supervisor (PID 1), the REPL worker, the program zygote.
- `grader`, `grader_child`, `grader_loader`: the trusted grader, its untrusted child, its loader.
- `kernel_startup`: what a Jupyter kernel runs at start.
- `run_code`: the program each SandboxFusion-style `/run_code` runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

from sandbox_env.inside.bundle import render

HERE = Path(__file__).resolve().parent
PACKAGE = __name__


@functools.cache
def source(name: str) -> str:
    """The text of `sandbox_env/inside/<name>.py`."""
    return (HERE / f"{name}.py").read_text()


def bundle(*names: str) -> str:
    """One program text that defines these modules (dependencies first) under their real names."""
    return render([(f"{PACKAGE}.{name}", source(name)) for name in names])
