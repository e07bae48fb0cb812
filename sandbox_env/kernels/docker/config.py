"""The Docker backend's options. Docker's own (DOCKER_HOST, TLS) are docker-py's environment."""

from __future__ import annotations

from pydantic import Field

from sandbox_env.kernels.base import KernelConfig


class DockerConfig(KernelConfig):
    image: str | None = Field(None, description="image for every container (default: the policy's "
                              "image, else sandbox-env/python:<version>)")
    owner: str | None = Field(None, description="the containers' owner label: a restarted server "
                              "removes its predecessor's orphans by it (default: the host name)")
