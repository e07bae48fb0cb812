"""The code that runs inside sandboxes: standard library only, and complete as a bundle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from sandbox_env.inside import HERE, bundle

# What a sandbox image provides beside the stdlib, imported only where a task needs it (pytest files).
IN_IMAGE = {"pytest"}
MODULES = sorted(p.stem for p in HERE.glob("*.py") if p.stem != "__init__")


def imported_roots(path: Path) -> set[tuple[str, str]]:
    """(top-level package, full name) of every import in the file, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.module))
    return found


def test_every_inside_module_imports_only_the_stdlib_and_its_siblings() -> None:
    assert {"runner", "worker", "zygote", "grader", "grader_loader", "wire", "bounded", "procs",
            "kernel_startup"} <= set(MODULES)
    for name in [*MODULES, "__init__"]:
        for root, full in imported_roots(HERE / f"{name}.py"):
            inside_sibling = full.startswith("sandbox_env.inside")
            assert root in sys.stdlib_module_names or inside_sibling or root in IN_IMAGE, f"{name}.py imports {full}"


def test_a_bundle_runs_in_a_bare_interpreter() -> None:
    """`python3 -I -S` with no sandbox_env installed: the bundle alone provides the modules."""
    program = bundle("bundle", "wire", "bounded", "procs") + (
        "from sandbox_env.inside.wire import encode, decode\n"
        "from sandbox_env.inside.bounded import BoundedOutput\n"
        "b = BoundedOutput(10); b.write('x' * 100)\n"
        "print(decode(encode({'kept': b.getvalue(), 'total': b.total})))\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", program], capture_output=True, text=True,
                         cwd="/", check=True)
    assert "'total': 100" in out.stdout and "90 bytes truncated" in out.stdout


def test_kernel_startup_bundle_loads_without_ipykernel() -> None:
    """The kernel's start-up code reaches ipykernel only at run time: its bundle loads bare."""
    program = bundle("procs", "snapshot", "kernel_startup") + (
        "import sys\n"
        "startup = sys.modules['sandbox_env.inside.kernel_startup']\n"
        "print(startup.NOTE, 'ipykernel' in sys.modules, 'zmq' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", program], capture_output=True, text=True,
                         cwd="/", check=True)
    assert out.stdout == "sandbox_env False False\n"
