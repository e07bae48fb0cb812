"""The farm's images (compose.yaml): server, gateway and Prometheus, built offline.

Built the way the sandbox image is (`kernels/docker/images.py`): each on a Debian root filesystem
that `debootstrap` fills on the host from the host's apt mirror (python3 for the server, haproxy
for the gateway, prometheus for monitoring), then a `docker build` that downloads nothing. The
server's Python dependencies come in as wheels `pip wheel` builds on the host from the package
registry, constrained by `constraints.txt`, put into the build context. Each image carries a
digest of what it was built from (`sandbox-env.source`): a tag whose sources changed is rebuilt,
one whose sources did not is kept (unless `force`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sandbox_env._version import __version__
from sandbox_env.errors import ConfigError, KernelUnavailableError
from sandbox_env.kernels.docker.images import OFFLINE_BASE, SUITE, build_images, build_offline_base, docker_build

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]  # a checkout: pyproject.toml, constraints.txt, images/
IMAGES = REPO / "images"
SOURCE_LABEL = "sandbox-env.source"
# image name -> (debootstrap packages, base tag): the base is made once and kept.
BASES = {
    "server": (("python3",), OFFLINE_BASE),
    "gateway": (("haproxy",), f"sandbox-env/debian-haproxy:{SUITE}"),
    "prometheus": (("prometheus",), f"sandbox-env/debian-prometheus:{SUITE}"),
}
FARM = ("server", "gateway")
MONITORING = ("prometheus",)


def farm_tag(name: str, version: str = __version__) -> str:
    """The tag compose.yaml names: sandbox-env/<name>:<version>."""
    return f"sandbox-env/{name}:{version}"


def build_farm_images(*, monitoring: bool = True, force: bool = False, mirror: str | None = None,
                      client: Any = None) -> list[str]:
    """Build the sandbox image, then the farm's (and Prometheus unless `monitoring=False`);
    return the tags built. Needs root, debootstrap, pip and a Docker engine; no Docker Hub."""
    client = client or _client()
    built = build_images(offline=None, force=force, mirror=mirror, client=client)
    for name in FARM + (MONITORING if monitoring else ()):
        tag = build_farm_image(name, client=client, force=force, mirror=mirror)
        if tag:
            built.append(tag)
    return built


def build_farm_image(name: str, *, client: Any, force: bool = False, mirror: str | None = None) -> str | None:
    """Build one farm image unless it is present and built from the same sources; its tag, or None."""
    packages, base = BASES[name]
    directory = IMAGES / name
    if not (directory / "Dockerfile").is_file():
        raise ConfigError(f"no {directory}/Dockerfile: the farm's images are built from a checkout")
    tag = farm_tag(name)
    digest = source_digest(name)
    old = _image(client, tag)
    if old is not None and not force and (old.labels or {}).get(SOURCE_LABEL) == digest:
        log.info("image %s is up to date", tag)
        return None
    if force or _image(client, base) is None:
        build_offline_base(client, mirror=mirror, packages=packages, tag=base)
    with tempfile.TemporaryDirectory(prefix=f"sandbox-env-{name}-") as tmp:
        context = Path(tmp) / "context"
        shutil.copytree(directory, context)
        if name == "server":
            build_wheels(context / "wheels")
        docker_build(client, context, tag, {"BASE": base}, pull=False, labels={SOURCE_LABEL: digest}, network_mode="none")
    for stage in client.images.list(filters={"dangling": True, "label": f"sandbox-env.stage={name}-install"}):
        _remove_quietly(client, stage.id)  # the install stage: nothing of it is needed after the build
    if old is not None and old.id != _image(client, tag).id:
        _remove_quietly(client, old.id)  # the tag moved on: the old image is no one's
    return tag


def build_wheels(dest: Path) -> None:
    """Every wheel the server image installs: this checkout's package with its server and docker
    extras and their dependencies (pinned by constraints.txt), plus pip itself to install them."""
    from pip import __version__ as pip_version

    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
            "--wheel-dir", str(dest), "--constraint", str(REPO / "constraints.txt"),
            f"{REPO}[server,docker]", f"pip=={pip_version}"]  # the host's own pip, pinned
    log.info("pip wheel %s[server,docker] (constraints.txt)", REPO)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KernelUnavailableError(f"pip wheel failed ({proc.returncode}): {proc.stderr[-2000:]}")


def source_digest(name: str) -> str:
    """What the image is made of: its folder under images/ and, for the server, the package's
    sources, pyproject.toml and constraints.txt."""
    paths = sorted(p for p in (IMAGES / name).rglob("*") if p.is_file())
    if name == "server":
        paths += sorted(p for p in (REPO / "sandbox_env").rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts)
        paths += [REPO / "pyproject.toml", REPO / "constraints.txt", *sorted((REPO / "policies").glob("*"))]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _image(client: Any, name: str) -> Any:
    import docker.errors

    try:
        return client.images.get(name)
    except docker.errors.ImageNotFound:
        return None


def _remove_quietly(client: Any, image_id: str) -> None:
    import docker.errors

    try:
        client.images.remove(image_id)
    except docker.errors.APIError as exc:  # still used by a container: kept
        log.info("kept the previous image %s: %s", image_id[:19], exc)


def _client() -> Any:
    try:
        import docker
    except ImportError as exc:
        raise KernelUnavailableError("the docker extra is not installed: pip install 'openenv-sandbox-env[docker]'") from exc
    try:
        return docker.from_env(timeout=900)
    except docker.errors.DockerException as exc:
        raise KernelUnavailableError(f"Docker engine unreachable: {exc}") from exc
