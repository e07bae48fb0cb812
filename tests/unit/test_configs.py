"""Each backend takes a typed config of its own, built from the server's settings: an unknown
option is an error, never logged and dropped."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sandbox_env.kernels import load_kernel_class
from sandbox_env.kernels.base import KernelConfig
from sandbox_env.kernels.docker.config import DockerConfig
from sandbox_env.kernels.jupyter.config import JupyterConfig
from sandbox_env.settings import Settings
from sandbox_env.testing import small_policy


@pytest.mark.parametrize("config_class", [KernelConfig, JupyterConfig, DockerConfig])
def test_an_unknown_option_is_refused(config_class: type[KernelConfig]) -> None:
    with pytest.raises(ValidationError, match="extra"):
        config_class(workdir=None)  # type: ignore[call-arg]


def test_the_jupyter_config_takes_its_fields_from_the_settings() -> None:
    settings = Settings(workdir_root="/srv/episodes", jupyter_unisolated=True, jupyter_bwrap_sources=["path"],
                        auth=False)
    assert JupyterConfig.from_settings(settings) == JupyterConfig(
        workdir_root="/srv/episodes", unisolated=True, bwrap_sources=("path",))
    assert JupyterConfig() == JupyterConfig(workdir_root=None, unisolated=False, bwrap_sources=("path", "wheel"))


def test_a_backend_refuses_another_backends_config() -> None:
    fake = load_kernel_class("fake")
    assert type(fake(small_policy()).config) is KernelConfig
    with pytest.raises(TypeError, match="KernelConfig"):
        fake(small_policy(), DockerConfig(image="x"))  # its options would be dropped silently


@pytest.mark.parametrize(("given", "expected"), [("", None), (None, None), ("rel/dir", None), ("/srv/x", "/srv/x")])
def test_the_workdir_root_is_absolute_or_none(given: str | None, expected: str | None, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: object) -> None:
    monkeypatch.chdir(str(tmp_path))
    root = JupyterConfig.from_settings(Settings(workdir_root=given, auth=False)).workdir_root
    # an empty value once reached mkdtemp(dir=""): relative kernel folders, and no kernel started
    assert root == (f"{tmp_path}/rel/dir" if given == "rel/dir" else expected)
