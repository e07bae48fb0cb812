"""The farm fixtures: one real farm per module and engine kind (compose, then Swarm)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from farm_helpers import Farm, compose_command, compose_farm, missing, swarm_farm

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="session")
def farm_images(docker_client: Any) -> None:
    """The farm's images, built from these sources (.ci/docker-setup.sh builds them in CI; here a
    stale or missing one is rebuilt, offline, as the same function does there)."""
    from sandbox_env.farm_images import FARM, MONITORING, SOURCE_LABEL, build_farm_image, farm_tag, source_digest

    os.environ.setdefault("DOCKER_BUILDKIT", "0")
    for name in FARM + MONITORING:
        try:
            labels = docker_client.images.get(farm_tag(name)).labels or {}
        except Exception:  # noqa: BLE001 - absent
            labels = {}
        if labels.get(SOURCE_LABEL) != source_digest(name):
            try:
                build_farm_image(name, client=docker_client)
            except Exception as exc:  # noqa: BLE001 - no debootstrap, no mirror, not root
                missing(f"cannot build {farm_tag(name)}: {exc}")


@pytest.fixture(scope="module", params=["compose", "swarm"])
def farm(request: pytest.FixtureRequest, farm_images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    tmp: Path = tmp_path_factory.mktemp(f"farm-{request.param}")
    if request.param == "compose":
        if compose_command() is None:
            missing("docker-compose is not installed (apt-get install docker-compose)")
        with compose_farm(tmp) as running:
            yield running
    else:
        with swarm_farm(tmp) as running:
            yield running


@pytest.fixture(autouse=True)
def _both_replicas_ready(request: pytest.FixtureRequest) -> None:
    """Each test starts on a farm of two ready replicas (a test before it may have loaded it)."""
    if "farm" in request.fixturenames:
        request.getfixturevalue("farm").wait_ready()
