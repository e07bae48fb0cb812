"""Backend name -> class, imported lazily so unused backends' libraries are never loaded."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from sandbox_env.errors import KernelUnavailableError, UnknownKernelError

if TYPE_CHECKING:
    from sandbox_env.kernels.base import Kernel

BUILTIN: dict[str, str] = {
    "jupyter": "sandbox_env.kernels.jupyter.kernel:JupyterKernel",
    "docker": "sandbox_env.kernels.docker.kernel:DockerKernel",
    "fake": "sandbox_env.kernels.fake:FakeKernel",  # in-process, NOT a sandbox: for tests (fake.py)
}
ENTRY_POINT_GROUP = "sandbox_env.kernels"


def available_kernels() -> list[str]:
    return sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def load_kernel_class(name: str) -> type[Kernel]:
    target = BUILTIN.get(name)
    if target is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise UnknownKernelError(f"unknown backend {name!r}; available: {', '.join(available_kernels())}")
        target = found[0].value
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KernelUnavailableError(f"backend {name!r} is not installed here: {exc}") from exc
    cls: type[Kernel] = getattr(module, attr)
    return cls
