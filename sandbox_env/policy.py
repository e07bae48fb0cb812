"""Declarative resource limits for one episode, loaded from `policies/<name>.toml`.

Field names follow docker-py's vocabulary where one exists. Imports models/errors only.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandbox_env.errors import ConfigError, PolicyNotFoundError

_PACKAGE_DIR = Path(__file__).resolve().parent
# A checkout keeps policies/ at the top; an installed wheel carries them inside the package.
POLICY_DIRS = (_PACKAGE_DIR.parent / "policies", _PACKAGE_DIR / "_policies")


class Policy(BaseModel):
    """Limits and isolation settings applied to every step of an episode."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    timeout_s: float = Field(10.0, gt=0, le=3600, description="wall-time limit of one step")
    cpu_time_s: float | None = Field(None, gt=0, description="CPU seconds for the whole episode")
    cpus: float = Field(1.0, gt=0, le=64, description="CPU quota, in cores")
    memory_mb: int = Field(512, ge=32, description="memory limit (memory+swap)")
    pids: int = Field(64, ge=4, le=32768, description="process and thread count limit")
    open_files: int = Field(256, ge=16, le=1048576)
    file_size_mb: int = Field(64, ge=1, description="largest file the code may write")
    output_bytes: int = Field(1 << 20, ge=1024, description="stdout/stderr kept per step (head+tail)")
    output_limit_bytes: int = Field(64 << 20, ge=1024, description="output that stops the step")
    workspace_mb: int = Field(256, ge=1, description="size of the writable workspace")
    tmp_mb: int = Field(64, ge=1, description="size of /tmp (container backends)")
    network: bool = Field(False, description="allow network access")
    runtime: Literal["runc", "runsc", "auto"] | None = Field(
        None, description="container runtime; auto = gVisor (runsc) where the host has it")
    image: str | None = Field(None, description="sandbox image (container backends)")
    language: str = Field("python", description="the language its sandboxes hold a toolchain for; the server "
                          "derives one policy per language a task names (sandbox_env/languages.py)")
    interrupt_grace_s: float = Field(1.0, gt=0, le=30, description="wait after SIGINT before kill")
    reuses: int = Field(0, ge=0, le=10_000, description="episodes one sandbox may serve after its first, each "
                        "after a clean-slate check (docker); 0: a new sandbox for every episode")


def policy_path(name: str, search: tuple[Path, ...] = POLICY_DIRS) -> Path:
    """Return the file of policy `name`, which may also be a path to a .toml file."""
    candidate = Path(name)
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate
    for directory in search:
        path = directory / f"{name}.toml"
        if path.is_file():
            return path
    raise PolicyNotFoundError(f"no policy named {name!r}; available: {', '.join(available_policies())}",
                              policy=name)


def available_policies(search: tuple[Path, ...] = POLICY_DIRS) -> list[str]:
    return sorted({p.stem for d in search if d.is_dir() for p in d.glob("*.toml")})


def load_policy(name: str) -> Policy:
    """Load and validate a policy; errors name the file and the bad field."""
    path = policy_path(name)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    data.setdefault("name", path.stem)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
