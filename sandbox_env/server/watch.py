"""An episode followed and exported: `/episodes/{id}/events` (the live page's event stream) and
`/episodes/{id}/notebook` (.ipynb) and `/trace` (JSONL).

Nothing here asks an interpreter anything: the stream and the exports read what the episode keeps
(`Episode.inspect`, `Episode.record`). An ended episode (reset or closed) stays exportable for
`record_ttl_s` (15 minutes by default) within `record_total_bytes` (`history.Records`).

Each open stream holds a connection for up to an hour: a tenant may hold `event_streams_per_tenant`
of them, and all tenants together at most `max_event_streams` (never more than half of
`max_connections`), so one tenant's pages never take the connections other tenants' requests need.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from sandbox_env.episode import Episode
from sandbox_env.manager import EpisodeManager
from sandbox_env.notebook import to_notebook, to_trace
from sandbox_env.server.farm import farm_of
from sandbox_env.server.guard import tenant_of
from sandbox_env.server.routes import json_dumps
from sandbox_env.server.web import _find, _summary
from sandbox_env.settings import Settings

router = APIRouter()
HEARTBEAT_S = 1.0  # the stream sends resource use (and a comment keeping proxies awake) this often
STREAM_S = 3600.0  # one stream's longest life: the page reconnects
UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class StreamSlots:
    """Open event streams, per tenant and in all, within the settings' limits."""

    def __init__(self, settings: Settings) -> None:
        self.per_tenant = settings.event_streams_per_tenant
        half = max(1, settings.max_connections // 2)
        self.total = min(settings.max_event_streams or half, half)
        self.open: dict[str, int] = {}

    def take(self, tenant: str) -> None:
        """Count one more stream of `tenant`, or raise 429."""
        mine, everyone = self.open.get(tenant, 0), sum(self.open.values())
        if mine >= self.per_tenant or everyone >= self.total:
            which = (f"this token already follows {mine} (event_streams_per_tenant)" if mine >= self.per_tenant
                     else f"the server already holds {everyone} (max_event_streams)")
            raise HTTPException(429, {"message": f"too many open event streams: {which}; close a live page and "
                                                 "try again", "code": "too_many_streams"},
                                headers={"Retry-After": "5"})
        self.open[tenant] = mine + 1

    def give_back(self, tenant: str) -> None:
        self.open[tenant] -= 1
        if not self.open[tenant]:
            del self.open[tenant]


class _Stream(StreamingResponse):
    """A streaming response that gives its slot back however it ends (done, disconnected, cancelled)."""

    def __init__(self, body: AsyncIterator[bytes], slots: StreamSlots, tenant: str, **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self.slots, self.tenant = slots, tenant

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slots.give_back(self.tenant)


def _record(request: Request, episode_id: str) -> dict[str, Any]:
    """A live episode's record, else an ended one's the caller may see, else 404."""
    try:
        return _find(request, episode_id).record()
    except HTTPException as exc:
        if exc.status_code != 404:
            raise
    tenant = tenant_of(request)
    manager: EpisodeManager = request.app.state.manager
    record = manager.records.find(episode_id, None if tenant.admin else tenant.name)
    if record is None:
        raise HTTPException(404, {"message": f"no live or recently ended episode {episode_id[:100]!r} (ended ones are "
                                             f"kept {manager.settings.record_ttl_s:g} s)", "code": "episode_not_found"})
    return record


async def _export(request: Request, episode_id: str, render: Callable[[dict[str, Any]], bytes], media_type: str,
                  suffix: str) -> Response:
    """The episode's record rendered for download; in a farm, the export made by the replica holding
    the episode (live or ended) when this one holds neither. (An event stream is followed on the
    replica of the episode: not forwarded.)"""
    try:
        record = _record(request, episode_id)
    except HTTPException:
        farm = farm_of(request)
        if farm is None or (forwarded := await farm.route(request, episode_id)) is None:
            raise
        return forwarded
    body = await asyncio.to_thread(render, record)
    name = UNSAFE.sub("_", str(record.get("episode_id") or record.get("session_id") or "episode"))[:80]
    return Response(body, media_type=media_type,
                    headers={"Content-Disposition": f'attachment; filename="{name}{suffix}"',
                             "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


@router.get("/episodes/{episode_id}/notebook", tags=["Inspection"],
            summary="The episode as a Jupyter notebook (nbformat v4): one cell per step, with its outputs")
async def export_notebook(episode_id: str, request: Request) -> Response:
    return await _export(request, episode_id, lambda record: json_dumps(to_notebook(record)).encode("utf-8"),
                         "application/x-ipynb+json", ".ipynb")


@router.get("/episodes/{episode_id}/trace", tags=["Inspection"],
            summary="The episode as JSON lines: the episode, then one line per step (for training pipelines)")
async def export_trace(episode_id: str, request: Request) -> Response:
    return await _export(request, episode_id,
                         lambda record: ("\n".join(to_trace(record)) + "\n").encode("utf-8", "replace"),
                         "application/x-ndjson", ".jsonl")


@router.get("/episodes/{episode_id}/events", tags=["Inspection"],
            summary="Server-sent events following a live episode: steps, output as it comes, resource use")
async def episode_events(episode_id: str, request: Request) -> StreamingResponse:
    """`state` (the episode now, as `GET /episodes/{id}` without the history's outputs) first and
    whenever a step begins or ends; `output` with what a running step wrote since the last one;
    `usage` every second. The page renders every field as text or as an image, never as markup."""
    slots: StreamSlots = request.app.state.event_streams
    tenant = tenant_of(request)
    farm = farm_of(request)
    if farm is not None and not request.app.state.manager.find(episode_id, None if tenant.admin else tenant.name):
        slots.take(tenant.name)  # this replica holds the connection too
        try:
            relayed = await farm.stream(request, episode_id)
        except BaseException:
            slots.give_back(tenant.name)
            raise
        if relayed is not None:
            body, status, media_type = relayed
            return _Stream(body, slots, tenant.name, status_code=status, media_type=media_type, headers=STREAM_HEADERS)
        slots.give_back(tenant.name)
    episode = _find(request, episode_id)
    slots.take(tenant.name)  # given back by the response, however it ends
    return _Stream(_events(episode, request), slots, tenant.name, media_type="text/event-stream",
                   headers=STREAM_HEADERS)


def _event(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json_dumps(data)}\n\n".encode()


async def _state(episode: Episode, since: int, episode_id: str | None) -> tuple[dict[str, Any], int]:
    """The episode now, with the history's entries after step `since` only (all of them after a
    reset: `fresh`); and the last step sent."""
    details = await episode.inspect()
    fresh = details["state"].get("episode_id") != episode_id
    history = [h for h in details["history"] if fresh or h["step"] > since]
    details.update(history=history, fresh=fresh, summary=_summary(episode))
    return details, max([h["step"] for h in history], default=0 if fresh else since)


async def _events(episode: Episode, request: Request) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    ends = loop.time() + STREAM_S
    live = episode.live
    offset, version, running, sent, episode_id = 0, -1, None, 0, None
    usage_at = 0.0
    while not episode.closed and loop.time() < ends and not await request.is_disconnected():
        if version != live.version:
            version = live.version
            step = (episode.running or {}).get("step")
            if step != running or not live.running:  # a step began or ended (or the episode was reset)
                running, offset = step, live.written  # the state carries what was written so far
                state, sent = await _state(episode, sent, episode_id)
                episode_id = state["state"].get("episode_id")
                yield await asyncio.to_thread(_event, "state", state)
            items, offset, skipped = live.since(offset)
            if items or skipped:
                yield _event("output", {"step": running, "items": items, "skipped": skipped})
        if loop.time() >= usage_at:
            usage_at = loop.time() + HEARTBEAT_S
            current = episode.running
            yield _event("usage", {"busy": episode.busy, "sample": episode.samples.items[-1] if episode.samples.items else None,
                                   "elapsed_s": None if current is None else round(time.time() - current["started"], 1)})
        await live.changed(version, HEARTBEAT_S)
    yield _event("end", {"closed": episode.closed})
