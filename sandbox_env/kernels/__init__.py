"""Execution backends, a module or package each; `load_kernel_class(name)` selects one by name."""

from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.registry import available_kernels, load_kernel_class

__all__ = ["Kernel", "available_kernels", "load_kernel_class"]
