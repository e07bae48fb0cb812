"""The farm seen from any replica: per-replica load, the whole farm's episode list and metrics.

`GET /farm/replica` is this replica's own line (name, status, load and capacity); `/episodes`
(through `listing`) and `/metrics?scope=farm` gather every replica's. Outside a farm the server
is a farm of one, named `local`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sandbox_env.manager import EpisodeManager
from sandbox_env.server.farm import FORWARDED, farm_of
from sandbox_env.server.guard import tenant_of

router = APIRouter()
LOCAL = "local"  # the name of a server outside a farm


def replica_name(request: Request) -> str:
    farm = farm_of(request)
    return farm.name if farm is not None else LOCAL


def replica_line(request: Request) -> dict[str, Any]:
    """This replica's status, and its load and capacity: the whole of it for the admin, the
    caller's own sessions and quota for a tenant (as `/episodes` counts them)."""
    manager: EpisodeManager = request.app.state.manager
    tenant = tenant_of(request)
    status = "draining" if manager.draining else "ready" if manager.ready() else "full"
    line: dict[str, Any] = {"replica": replica_name(request), "status": status}
    if tenant.admin:
        line.update(active=manager.active, capacity=manager.capacity, pools=manager.pool_stats())
    else:
        quota = manager.settings.tenant_max_sessions
        line.update(active=manager.used(tenant.name), capacity=min(quota or manager.capacity, manager.capacity))
    return line


def named(request: Request, body: Any, status_code: int = 200) -> JSONResponse:
    """A JSON reply that says which replica made it (how peers learn each other's names)."""
    return JSONResponse(body, status_code=status_code,  # the sandbox's strings inside: never sniffed as HTML
                        headers={FORWARDED: replica_name(request), "X-Content-Type-Options": "nosniff"})


@router.get("/farm/replica", tags=["Inspection"], summary="This replica: name, status, load and capacity")
async def this_replica(request: Request) -> JSONResponse:
    return named(request, replica_line(request))


async def listing(request: Request, local: dict[str, Any]) -> JSONResponse:
    """`local` (this replica's `/episodes`), or, asked from outside in a farm, every replica's:
    episodes side by side, `replicas` one line each, counts summed over the replicas that answered."""
    line = replica_line(request)
    for episode in local["episodes"]:
        episode["replica"] = line["replica"]
    farm = farm_of(request)
    if farm is None or farm.forwarded(request):
        return named(request, {**local, "replica": line, "replicas": [line]})
    lines, episodes = [line], list(local["episodes"])
    for address, reply in await farm.gather(request, "/episodes"):
        if reply is None or reply.status_code != 200:
            lines.append({"replica": farm.names_by_address().get(address, address), "status": "unreachable",
                          "active": None, "capacity": None})
            continue
        body = reply.json()
        lines.append(body.get("replica") or {"replica": address, "status": "unknown"})
        episodes += body.get("episodes", [])
    answered = [r for r in lines if isinstance(r.get("active"), int)]
    merged = {key: value for key, value in local.items() if key != "pools"}
    merged.update(active=sum(r["active"] for r in answered), capacity=sum(r["capacity"] for r in answered),
                  replica=line, replicas=lines, episodes=episodes)
    return named(request, merged)


class _Labelled(Collector):
    """A registry's samples with `replica="<name>"` added to each."""

    def __init__(self, registry: Any, replica: str) -> None:
        self.registry = registry
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(sample.name, {"replica": self.replica, **sample.labels}, sample.value,
                                    sample.timestamp, sample.exemplar)
            yield labelled


class _Merged(Collector):
    """Several replicas' families, one family per name (Prometheus refuses a name twice)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for family in self.families:
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            into.samples.extend(family.samples)
        yield from merged.values()


async def metrics(request: Request) -> Response:
    """This replica's metrics, each sample labelled with the replica (what Prometheus scrapes from
    each); with `?scope=farm`, asked from outside, every replica's in one exposition. Outside a
    farm, unlabelled."""
    farm = farm_of(request)
    if farm is None:  # a lone server's metrics, unlabelled as ever
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
    local = _Labelled(request.app.state.metrics.registry, farm.name)
    if request.query_params.get("scope") != "farm" or farm.forwarded(request):
        return Response(generate_latest(local), media_type=CONTENT_TYPE_LATEST)
    families = list(local.collect())
    for _, reply in await farm.gather(request, "/metrics"):
        if reply is not None and reply.status_code == 200:
            families += list(text_string_to_metric_families(reply.text))
    return Response(generate_latest(_Merged(families)), media_type=CONTENT_TYPE_LATEST)
