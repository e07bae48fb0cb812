"""Several modules of this package as one program text, for a sandbox that has none of them.

The text registers each module in `sys.modules` under its real name (`sandbox_env.inside.wire`
...), in the order given, so the modules import each other exactly as they do on the host. Each
keeps its source in `__source__`, so that a sandbox process can render the bundle again for an
interpreter it starts itself (a fresh worker or zygote).
"""

from __future__ import annotations

HEAD = '''
def _install_bundle(modules):
    import sys, types
    for name in ("sandbox_env", "sandbox_env.inside"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = []
            sys.modules[name] = package
    for name, text in modules:
        module = types.ModuleType(name)
        module.__file__, module.__source__ = "<" + name + ">", text
        sys.modules[name] = module
        exec(compile(text, module.__file__, "exec"), module.__dict__)
'''


def render(modules: list[tuple[str, str]]) -> str:
    """`modules`: (name, source) pairs, dependencies first."""
    return f"{HEAD}_install_bundle({modules!r})\ndel _install_bundle\n"


def rebundle(*names: str) -> str:
    """Inside a sandbox: the bundle of modules this process already holds (see `__source__`)."""
    import sys

    return render([(name, sys.modules[name].__source__) for name in names])  # type: ignore[attr-defined]
