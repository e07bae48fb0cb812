"""Per-episode inspection: JSON under `/episodes`, and a page at `/web` that renders it.

The page is static HTML plus a small script that polls the JSON routes and renders with
`textContent` only, so output of the sandboxed code can never inject markup.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from sandbox_env.episode import Episode
from sandbox_env.manager import SessionManager
from sandbox_env.server.guard import tenant_of
from sandbox_env.server.routes import json_dumps

router = APIRouter()
INSPECT_TIMEOUT_S = 3.0


def _manager(request: Request) -> SessionManager:
    manager: SessionManager = request.app.state.manager
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


@router.get("/episodes", tags=["Inspection"], summary="Live episodes (the caller's; the admin's: all)")
async def list_episodes(request: Request) -> dict[str, Any]:
    manager = _manager(request)
    tenant = tenant_of(request)
    if tenant.admin:
        return {"active": manager.active, "capacity": manager.capacity, "pools": manager.pool_stats(),
                "episodes": [_summary(ep) for ep in manager.owned(None)]}
    own = manager.owned(tenant.name)
    quota = manager.settings.tenant_max_sessions
    return {"active": len(own), "capacity": min(quota or manager.capacity, manager.capacity),
            "episodes": [_summary(ep) for ep in own]}


@router.get("/episodes/{episode_id}", tags=["Inspection"],
            summary="One episode: state, variables, resource use and step history")
async def show_episode(episode_id: str, request: Request) -> Response:
    """The history may hold up to `history_bytes`: it is encoded on a worker thread, so a large
    one never stalls the event loop (and every other session's steps)."""
    episode = _find(request, episode_id)
    details: dict[str, Any] = {"state": episode.state.model_dump(mode="json"), "kernel": {},
                               "history": list(episode.history)}
    if not episode.busy:  # a running step holds the interpreter: never wait for it here
        try:
            details = await asyncio.wait_for(episode.inspect(), INSPECT_TIMEOUT_S)
        except (TimeoutError, Exception):  # noqa: BLE001 - inspection is best effort
            pass
    kernel = {"variables": [], **(details.get("kernel") or {})}
    payload = {**details, "kernel": kernel, "summary": _summary(episode)}
    body = await asyncio.to_thread(lambda: json_dumps(payload).encode("utf-8"))
    return Response(body, media_type="application/json")


@router.delete("/episodes/{episode_id}", tags=["Inspection"], summary="Close an episode")
async def close_episode(episode_id: str, request: Request) -> dict[str, Any]:
    await _manager(request).close_episode(_find(request, episode_id))
    return {"closed": episode_id}


def _find(request: Request, episode_id: str) -> Episode:
    """The episode, if the caller may see it: another tenant's is as absent as a closed one."""
    episode = _manager(request).find(episode_id)
    if episode is None or not tenant_of(request).may_touch(episode.owner):
        raise HTTPException(404, {"message": f"no live episode {episode_id[:100]!r}", "code": "episode_not_found"})
    return episode


@router.get("/web", response_class=HTMLResponse, include_in_schema=False)
async def episodes_page() -> str:
    return PAGE.replace("__MODE__", "list").replace("__ID__", "")


@router.get("/web/episodes/{episode_id}", response_class=HTMLResponse, include_in_schema=False)
async def episode_page(episode_id: str) -> str:
    # The id only ever reaches the page as a JSON string literal, read back with JSON.parse.
    import json

    literal = json.dumps(json.dumps(episode_id)).replace("<", "\\u003c")  # no "</script>" in a literal
    return PAGE.replace("__MODE__", "detail").replace('"__ID__"', literal)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sandbox-env episodes</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
pre{background:#f6f6f6;padding:.5rem;margin:.25rem 0;white-space:pre-wrap;max-height:20rem;overflow:auto}
.step{border-left:4px solid #999;padding-left:.75rem;margin:1rem 0}
.ok{border-color:#2a2}.error{border-color:#c22}.timeout,.oom,.killed,.output_limit{border-color:#e90}
.badge{font-weight:bold}.muted{color:#777}
</style></head><body>
<h1><a href="/web">sandbox-env</a> <span id="title" class="muted"></span></h1>
<div id="root">loading…</div>
<script>
const MODE = "__MODE__", EPISODE = JSON.parse("__ID__" || '""');
function el(tag, text, cls) { const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function table(rows, cols) { const t = el("table"), h = el("tr");
  cols.forEach(c => h.appendChild(el("th", c))); t.appendChild(h);
  rows.forEach(r => { const tr = el("tr"); cols.forEach(c => { const td = el("td");
    if (c === "id") { const a = el("a", r[c]); a.href = "/web/episodes/" + encodeURIComponent(r[c]); td.appendChild(a); }
    else td.textContent = r[c] === undefined || r[c] === null ? "" : String(r[c]);
    tr.appendChild(td); }); t.appendChild(tr); }); return t; }
async function renderList(root) {
  const data = await (await fetch("/episodes")).json();
  document.getElementById("title").textContent = `${data.active}/${data.capacity} sessions`;
  root.replaceChildren(table(data.episodes, ["id","owner","backend","policy","step_count",
    "last_status","last_exit_code","busy","age_s","idle_s"]));
  if (!data.episodes.length) root.appendChild(el("p", "No live episodes.", "muted"));
}
async function renderDetail(root) {
  const resp = await fetch("/episodes/" + encodeURIComponent(EPISODE));
  if (!resp.ok) { root.replaceChildren(el("p", "Episode " + EPISODE + " is not live.")); return; }
  const data = await resp.json(), k = data.kernel || {}, s = data.summary;
  document.getElementById("title").textContent = "episode " + EPISODE;
  const parts = [el("h2", "State"), table([s], ["backend","policy","step_count","last_status","busy","age_s","idle_s"]),
    el("h2", "Resources"), table([{memory_mb: k.memory_mb, cpu_time_s: k.cpu_time_s,
      processes: k.processes, limits: k.limits}], ["memory_mb","cpu_time_s","processes","limits"]),
    el("h2", "Variables"), table(k.variables || [], ["name","type","repr"]), el("h2", "History")];
  (data.history || []).forEach(h => { const r = h.result || {}, box = el("div", null, "step " + r.status);
    box.appendChild(el("div", `#${h.step}  ${r.status}  exit ${r.exit_code}  ${(r.wall_time_s||0).toFixed(3)} s`, "badge"));
    box.appendChild(el("pre", h.code));
    if (r.stdout) box.appendChild(el("pre", r.stdout));
    if (r.stderr) box.appendChild(el("pre", r.stderr, "muted"));
    if (r.exception && !r.stderr) box.appendChild(el("pre", r.exception.traceback || (r.exception.type + ": " + r.exception.message)));
    parts.push(box); });
  root.replaceChildren(...parts);
}
async function tick() { const root = document.getElementById("root");
  try { await (MODE === "list" ? renderList(root) : renderDetail(root)); }
  catch (e) { root.replaceChildren(el("p", "Server unreachable: " + e)); } }
tick(); setInterval(tick, 2000);
</script></body></html>
"""
