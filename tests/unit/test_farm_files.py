"""compose.yaml, compose.monitoring.yaml and the gateway's config say what docs/scaling.md says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sandbox_env.farm_images import FARM, MONITORING, farm_tag

REPO = Path(__file__).resolve().parents[2]


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / name).read_text())
    return data


def test_the_compose_files_name_the_tags_the_images_build_makes() -> None:
    services = {**load("compose.yaml")["services"], **load("compose.monitoring.yaml")["services"]}
    assert {name: spec["image"] for name, spec in services.items()} == {
        name: farm_tag(name) for name in FARM + MONITORING}


def test_only_the_server_gets_the_docker_socket_and_it_is_otherwise_unprivileged() -> None:
    services = {**load("compose.yaml")["services"], **load("compose.monitoring.yaml")["services"]}
    for name, spec in services.items():
        sources = [volume.get("source") for volume in spec.get("volumes", [])]
        assert ("/var/run/docker.sock" in sources) == (name == "server"), name
        assert spec["cap_drop"] == ["ALL"] and spec["read_only"] is True, name
        assert "privileged" not in spec and "no-new-privileges:true" in spec["security_opt"], name


def test_the_files_read_the_same_under_compose_and_swarm() -> None:
    """No `profiles` (docker stack deploy refuses it); no VIP or routing mesh (no IPVS here):
    dnsrr replicas, the gateway's port in host mode; a version stack deploy takes."""
    for name in ("compose.yaml", "compose.monitoring.yaml"):
        data = load(name)
        assert data["version"].startswith("3.")
        assert all("profiles" not in spec for spec in data["services"].values()), name
        for spec in data["services"].values():
            assert all(port["mode"] == "host" for port in spec.get("ports", [])), name
    server = load("compose.yaml")["services"]["server"]
    assert server["deploy"]["endpoint_mode"] == "dnsrr"
    assert server["environment"]["SANDBOX_ENV_FARM_PEERS"] == "server"
    assert server["env_file"] and "ports" not in server  # auth on: a token from the env file; only the gateway is published
    farm = load("compose.yaml")
    assert farm["networks"]["farm"]["internal"] is True and server["networks"] == ["farm"]  # no route out
    assert farm["services"]["gateway"]["networks"] == ["farm", "edge"]


def test_the_gateway_balances_least_connections_and_checks_readyz() -> None:
    config = (REPO / "images/gateway/haproxy.cfg").read_text().split("\n")
    lines = [line.strip() for line in config if line.strip() and not line.strip().startswith("#")]
    assert "balance leastconn" in lines
    assert "http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost" in lines
    # full replicas stay in the rotation (they refuse new sessions themselves); draining ones leave
    assert "http-check expect rstring (ready|full)" in lines
    assert "http-request del-header x-sandbox-env-farm" in lines  # a client never passes for a replica
    assert any(line.startswith("timeout tunnel") for line in lines)
