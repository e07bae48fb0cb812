"""Per-episode inspection: JSON under `/episodes`, and a page at `/web` that renders it.

The page is a Jinja2 template (autoescaped) plus a static script that follows an episode's event
stream (`watch.py`) and renders with `textContent` only, images as `data:` (PNG, JPEG)
or `blob:` (SVG) URLs of an `<img>` (which runs no script), so output of the sandboxed code can never
inject markup; the Content-Security-Policy allows no inline script and no other origin, images
from the server, `data:` and `blob:` (the page's own) only.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from sandbox_env.episode import Episode
from sandbox_env.manager import EpisodeManager
from sandbox_env.server.farm import FORWARDED, farm_of
from sandbox_env.server.farm_view import listing, named, replica_name
from sandbox_env.server.guard import tenant_of
from sandbox_env.server.routes import json_dumps

router = APIRouter()
HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=HERE / "templates")  # autoescape on for .html
STATIC_TYPES = {"episodes.js": "text/javascript", "episodes.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page's URL may carry ?token=
}


def _manager(request: Request) -> EpisodeManager:
    manager: EpisodeManager = request.app.state.manager
    return manager


def _summary(episode: Episode) -> dict[str, Any]:
    state = episode.state
    last = episode.history[-1]["result"] if episode.history else None
    return {
        "id": state.episode_id or episode.session_id,  # what /episodes/{id} and DELETE take
        "episode_id": state.episode_id,
        "session_id": episode.session_id,
        "owner": episode.owner,
        "backend": state.backend,
        "policy": state.policy,
        "step_count": state.step_count,
        "last_exit_code": state.last_exit_code,
        "last_status": last["status"] if last else None,
        "busy": episode.busy,
        "age_s": round(time.time() - episode.created_at, 1),
        "idle_s": round(time.monotonic() - episode.last_active, 1),
    }


@router.get("/episodes", tags=["Inspection"], summary="Live episodes (the caller's; the admin's: all; in a farm, every replica's)")
async def list_episodes(request: Request) -> Response:
    manager = _manager(request)
    tenant = tenant_of(request)
    if tenant.admin:
        local = {"active": manager.active, "capacity": manager.capacity, "pools": manager.pool_stats(),
                 "episodes": [_summary(ep) for ep in manager.owned(None)]}
    else:
        quota = manager.settings.tenant_max_sessions
        local = {"active": manager.used(tenant.name), "capacity": min(quota or manager.capacity, manager.capacity),
                 "episodes": [_summary(ep) for ep in manager.owned(tenant.name)]}
    return await listing(request, local)


@router.get("/episodes/{episode_id}", tags=["Inspection"],
            summary="One episode: state, variables, resource use and step history (in a farm, from its replica)")
async def show_episode(episode_id: str, request: Request) -> Response:
    """Answers at once, a step running or not, and sends the interpreter nothing (`Episode.inspect`).
    The history may hold up to `history_bytes`: it is encoded on a worker thread, so a large one
    never stalls the event loop (and every other session's steps)."""
    if (elsewhere := await _owner_elsewhere(request, episode_id)) is not None:
        return elsewhere
    episode = _find(request, episode_id)
    details = await episode.inspect()
    payload = {**details, "summary": _summary(episode)}
    body = await asyncio.to_thread(lambda: json_dumps(payload).encode("utf-8"))
    return Response(body, media_type="application/json",
                    headers={FORWARDED: replica_name(request), "X-Content-Type-Options": "nosniff"})


@router.delete("/episodes/{episode_id}", tags=["Inspection"], summary="Close an episode (in a farm, on its replica)")
async def close_episode(episode_id: str, request: Request) -> Response:
    if (elsewhere := await _owner_elsewhere(request, episode_id)) is not None:
        return elsewhere
    await _manager(request).close_episode(_find(request, episode_id))
    return named(request, {"closed": episode_id})


async def _owner_elsewhere(request: Request, episode_id: str) -> Response | None:
    """In a farm, the answer of the replica that holds `episode_id` when this one does not."""
    farm = farm_of(request)
    if farm is None:
        return None
    tenant = tenant_of(request)
    if _manager(request).find(episode_id, None if tenant.admin else tenant.name):
        return None
    return await farm.route(request, episode_id)


def _find(request: Request, episode_id: str) -> Episode:
    """The episode, among those the caller may see: another tenant's is as absent as a closed
    one. An episode_id (chosen by clients) that names several is refused: the session_id does not."""
    tenant = tenant_of(request)
    found = _manager(request).find(episode_id, None if tenant.admin else tenant.name)
    if not found:
        raise HTTPException(404, {"message": f"no live episode {episode_id[:100]!r}", "code": "episode_not_found"})
    if len(found) > 1:
        raise HTTPException(409, {"message": f"{len(found)} live episodes have the episode_id "
                                             f"{episode_id[:100]!r}: name one by its session_id (GET /episodes "
                                             "lists them)", "code": "ambiguous_episode_id"})
    return found[0]


@router.get("/web", response_class=HTMLResponse, include_in_schema=False)
async def episodes_page(request: Request) -> Response:
    return _page(request, mode="list", episode_id="")


@router.get("/web/episodes/{episode_id}", response_class=HTMLResponse, include_in_schema=False)
async def episode_page(request: Request, episode_id: str) -> Response:
    return _page(request, mode="detail", episode_id=episode_id)


@router.get("/web/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    if name not in STATIC_TYPES:  # a fixed set: no path ever reaches the filesystem
        raise HTTPException(404, {"message": "no such file", "code": "not_found"})
    return Response((HERE / "static" / name).read_bytes(), media_type=STATIC_TYPES[name],
                    headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})


def _page(request: Request, **context: str) -> Response:
    response = TEMPLATES.TemplateResponse(request, "episodes.html", context)
    response.headers.update(SECURITY_HEADERS)
    return response
