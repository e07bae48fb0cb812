"""Build the sandbox images, with Docker Hub or fully offline from the host's apt mirror.

Both paths build the same `images/python/Dockerfile`; only its `BASE` differs. Online it is
`debian:bookworm-slim`. Offline, `debootstrap --variant=minbase --include=python3` fills a root
filesystem from the mirror the host's apt already uses (read from its sources, never hard-coded),
which is stripped, imported as `sandbox-env/debian-base:bookworm` and used as the base; python3 is
then already present, so the `docker build` itself needs no network. Tags carry the project
version, and an existing tag is kept unless `force=True`.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from sandbox_env._version import __version__
from sandbox_env.errors import ConfigError, KernelUnavailableError

logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parents[2]  # sandbox_env/
# A checkout keeps images/ at the top; a wheel may carry them inside the package.
IMAGE_DIRS = (_PACKAGE_DIR.parent / "images", _PACKAGE_DIR / "_images")
SUITE = "bookworm"
HUB_BASE = "debian:bookworm-slim"
OFFLINE_BASE = f"sandbox-env/debian-base:{SUITE}"
PYTHON_IMAGE = "sandbox-env/python"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# Removed from the bootstrapped tree before import: caches and docs a sandbox never reads.
STRIP = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
         "usr/share/info", "usr/share/locale", "var/log")


def python_image_tag(version: str = __version__) -> str:
    return f"{PYTHON_IMAGE}:{version}"


def build_images(offline: bool | None = None, *, force: bool = False, mirror: str | None = None,
                 client: Any = None) -> list[str]:
    """Build every sandbox image and return the tags built (existing tags are skipped).

    `offline=None` picks by itself: a local or reachable `debian:bookworm-slim` means the Hub
    path, anything else the debootstrap path. `mirror` overrides the one read from apt's sources.
    """
    client = client or _client()
    tag = python_image_tag()
    if not force and _has_image(client, tag):
        logger.info("image %s already present (force=True rebuilds it)", tag)
        return []
    if offline is None:
        offline = not (_has_image(client, HUB_BASE) or hub_reachable())
    built: list[str] = []
    base = HUB_BASE
    if offline:
        base = OFFLINE_BASE
        if force or not _has_image(client, base):
            build_offline_base(client, mirror=mirror)
            built.append(base)
    docker_build(client, _dockerfile_dir("python"), tag, {"BASE": base},
                  pull=not offline and not _has_image(client, base))
    return [*built, tag]


def build_language_images(names: list[str], *, offline: bool | None = None, force: bool = False,
                          mirror: str | None = None, client: Any = None) -> list[str]:
    """Build the images of `names` (languages.py; "all": every one), each the Python image plus its
    Debian toolchain (`images/toolchain/Dockerfile`), after the Python image itself; return the
    tags built. apt inside the build reads the mirror the base was bootstrapped from: no Docker Hub."""
    from sandbox_env import languages

    client = client or _client()
    built = build_images(offline, force=force, mirror=mirror, client=client)
    chosen = languages.names() if "all" in names else [languages.canonical(n) for n in names]
    for lang in (languages.get(n) for n in chosen):
        tag = lang.image()
        if not lang.packages or (not force and _has_image(client, tag)):
            continue  # runs in the Python image, or already built
        docker_build(client, _dockerfile_dir("toolchain"), tag,
                     {"BASE": python_image_tag(), "PACKAGES": " ".join(lang.packages),
                      "CHECK": f"{lang.binaries[0]} --version"}, pull=False, labels={"sandbox-env.language": lang.name})
        built.append(tag)
    return built


def build_offline_base(client: Any, *, mirror: str | None = None, packages: tuple[str, ...] = ("python3",),
                       tag: str = OFFLINE_BASE) -> str:
    """debootstrap a minimal Debian with `packages` (python3 by default) from the host's mirror and
    import it as `tag` (needs root). The farm's images use other package sets (farm_images.py)."""
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if debootstrap is None:
        raise KernelUnavailableError("offline image build needs debootstrap: apt-get install debootstrap")
    mirror = mirror or apt_mirror()
    with tempfile.TemporaryDirectory(prefix="sandbox-env-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        logger.info("debootstrap %s (%s) from %s (a minute or two)", SUITE, ", ".join(packages), mirror)
        _run([debootstrap, "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(root), mirror])
        for rel in STRIP:
            target = root / rel
            if target.is_dir() and not target.is_symlink():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        tarball = Path(tmp) / "rootfs.tar"
        _run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(tarball), "."])
        repository, _, version = tag.partition(":")
        with tarball.open("rb") as data:
            client.api.import_image(src=data, repository=repository, tag=version)
    logger.info("imported %s", tag)
    return tag


def apt_mirror(suite: str = SUITE, sources: tuple[Path, ...] = APT_SOURCES) -> str:
    """The Debian mirror the host's apt uses (one-line and deb822 formats), preferring one for `suite`."""
    entries: list[tuple[str, list[str]]] = []
    files: list[Path] = []
    for path in sources:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources"))
        elif path.is_file():
            files.append(path)
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        entries += _deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text)
    debian = [(uri, suites) for uri, suites in entries
              if uri.startswith(("http://", "https://", "file:/")) and not uri.rstrip("/").endswith("-security")]
    for uri, suites in debian:
        if suite in suites:
            return uri
    for uri, _ in debian:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    raise ConfigError(f"no Debian mirror found in the apt sources ({', '.join(map(str, sources))}); "
                      "pass mirror=... explicitly")


def _deb822_entries(text: str) -> list[tuple[str, list[str]]]:
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            entries += [(uri, fields.get("suites", "").split()) for uri in fields.get("uris", "").split()]
    return entries


def _one_line_entries(text: str) -> list[tuple[str, list[str]]]:
    entries = []
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()  # type: ignore[assignment]
        if len(line) >= 3 and line[0] == "deb":
            entries.append((line[1], [line[2]]))
    return entries


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """A quick TCP check of Docker Hub's registry; the daemon's own access is assumed to match."""
    try:
        with socket.create_connection(("registry-1.docker.io", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _dockerfile_dir(name: str) -> Path:
    for directory in IMAGE_DIRS:
        if (directory / name / "Dockerfile").is_file():
            return directory / name
    raise ConfigError(f"no Dockerfile for image {name!r} in {', '.join(map(str, IMAGE_DIRS))}")


def docker_build(client: Any, path: Path, tag: str, buildargs: dict[str, str], *, pull: bool,
                 labels: dict[str, str] | None = None, network_mode: str | None = None) -> None:
    """`docker build` of `path` as `tag`, labelled with the version (and `labels`); its log's end
    in the error when it fails."""
    logger.info("docker build %s (%s)", tag, ", ".join(f"{k}={v}" for k, v in buildargs.items()))
    try:
        client.images.build(path=str(path), tag=tag, buildargs=buildargs, pull=pull, rm=True, forcerm=True,
                            labels={"sandbox-env.version": __version__, **(labels or {})}, network_mode=network_mode)
    except Exception as exc:
        log = getattr(exc, "build_log", None) or []
        tail = "".join(str(item.get("stream", item.get("error", ""))) for item in list(log)[-20:])
        raise KernelUnavailableError(f"building {tag} failed: {exc}\n{tail}") from exc


def _has_image(client: Any, name: str) -> bool:
    import docker.errors

    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


def _client() -> Any:
    try:
        import docker
    except ImportError as exc:
        raise KernelUnavailableError("the docker extra is not installed: pip install 'openenv-sandbox-env[docker]'") from exc
    try:
        return docker.from_env(timeout=600)
    except docker.errors.DockerException as exc:
        raise KernelUnavailableError(f"Docker engine unreachable: {exc}") from exc


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KernelUnavailableError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
