"""HTTP endpoints: OpenEnv's stateless `/reset`, `/step`, `/state`, plus probes and descriptions.

`/reset` and `/step` keep OpenEnv's semantics: each request gets a throwaway episode (counted
toward capacity) that is closed before the reply, so `x = 1` then `print(x)` over HTTP fails.
Stateful episodes are the job of `/ws`.
"""

from __future__ import annotations

import functools
import json
import logging
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _StarletteJSONResponse
from fastapi.responses import Response
from pydantic import ValidationError

from sandbox_env._version import __version__
from sandbox_env.errors import SandboxEnvError
from sandbox_env.models import (
    CodeAction,
    CodeObservation,
    EpisodeState,
    GradeRequest,
    Grading,
    ResetRequest,
    StepRequest,
    StepResponse,
)
from sandbox_env.server.farm_view import metrics as farm_metrics
from sandbox_env.server.guard import tenant_of
from sandbox_env.server.json_limits import MAX_JSON_DEPTH
from sandbox_env.server.metrics import timed_step

if TYPE_CHECKING:
    from sandbox_env.manager import EpisodeManager

log = logging.getLogger(__name__)

ENV_NAME = "sandbox_env"
DISTRIBUTION = "openenv-sandbox-env"
DESCRIPTION = ("Stateful, sandboxed Python execution episodes (one Jupyter kernel or container "
               "per episode) speaking OpenEnv's protocol.")
RETRY_AFTER_S = "1"


def _clip_depth(value: Any, limit: int) -> Any:
    if isinstance(value, dict | list) and limit <= 0:
        return "[nested too deep]"
    if isinstance(value, dict):
        return {k: _clip_depth(v, limit - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clip_depth(v, limit - 1) for v in value]
    return value


def json_dumps(obj: Any) -> str:
    """Compact JSON text that is always valid UTF-8 (a lone surrogate becomes '?'); values JSON
    cannot represent (e.g. in error details) become strings rather than failing the reply, and
    containers nested past MAX_JSON_DEPTH become a marker."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)
    except (ValueError, RecursionError):  # nested deeper than the encoder goes
        text = json.dumps(_clip_depth(obj, MAX_JSON_DEPTH), ensure_ascii=False, separators=(",", ":"),
                          default=str)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text


class JSONResponse(_StarletteJSONResponse):
    """Starlette's JSONResponse raises on lone surrogates in output; this one replaces them."""

    def render(self, content: Any) -> bytes:
        try:
            text = json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str)
        except (ValueError, RecursionError):
            text = json_dumps(content)
        return text.encode("utf-8", "replace")


MAX_ERRORS = 20  # listed in a reply: a message can hold 100k wrong values


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as JSON, without echoing the (possibly huge) input back; the first few."""
    return jsonable_encoder(exc.errors(include_url=False, include_input=False)[:MAX_ERRORS])


def observation_response(observation: CodeObservation) -> JSONResponse:
    return JSONResponse(observation.to_wire())


def error_response(exc: SandboxEnvError) -> JSONResponse:
    """A service error as `{"detail": {...}}` with its HTTP status; 503 carries Retry-After."""
    headers = {"Retry-After": RETRY_AFTER_S} if exc.http_status in (429, 503) else None
    return JSONResponse({"detail": jsonable_encoder(exc.to_dict())}, status_code=exc.http_status,
                        headers=headers)


async def sandbox_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SandboxEnvError)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.observe_error(exc.code)
    if exc.http_status >= 500 and exc.http_status != 503:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc)
    return error_response(exc)


async def request_validation_handler(request: Request, exc: Exception) -> Response:
    """422 for a bad body, path or query: each error's location, type and message, never the
    input itself (FastAPI's default handler echoes the whole body back, secrets and all)."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())][:16], "type": str(err.get("type", "")),
               "msg": str(err.get("msg", ""))[:500]} for err in exc.errors()[:50]]
    return JSONResponse({"detail": errors}, status_code=422)


def _manager(request: Request) -> EpisodeManager:
    manager: EpisodeManager = request.app.state.manager
    return manager


router = APIRouter()
_OBS_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"description": "Server at capacity (see Retry-After) or backend unavailable"},
}


@router.post("/reset", response_model=StepResponse, tags=["Environment"], responses=_OBS_RESPONSES,
             summary="Reset a throwaway episode (stateless, as in OpenEnv)")
async def reset(request: Request, body: Annotated[ResetRequest | None, Body()] = None) -> Response:
    async with _manager(request).stateless(tenant_of(request).name) as episode:
        observation = await episode.reset(**(body or ResetRequest()).reset_kwargs())
    return observation_response(observation)


@router.post("/step", response_model=StepResponse, tags=["Environment"], responses=_OBS_RESPONSES,
             summary="Run one action in a fresh throwaway episode (stateless, as in OpenEnv)")
async def step(request: Request, body: StepRequest) -> Response:
    try:
        action = CodeAction.model_validate(body.action)
    except ValidationError as exc:
        return JSONResponse({"detail": validation_errors(exc)}, status_code=422)
    async with _manager(request).stateless(tenant_of(request).name) as episode:
        observation = await timed_step(request.app.state.metrics, episode, action,
                                       timeout_s=body.timeout_s)
    return observation_response(observation)


@router.post("/grade", response_model=Grading, tags=["Environment"],
             responses={404: {"description": "Unknown task_id"}, **_OBS_RESPONSES},
             summary="Grade a submission against a task (one-shot, no episode)")
async def grade(request: Request, body: GradeRequest) -> Response:
    manager = _manager(request)
    if (body.task is None) == (body.task_id is None):
        return JSONResponse({"detail": [{"loc": ["body", "task"], "type": "value_error",
                                         "msg": "give exactly one of task and task_id"}]}, status_code=422)
    owner = tenant_of(request).name
    manager.admit_grading(owner)  # drain, capacity and quotas before the client's task is compiled
    task = manager.resolve_task(body.task_id, body.task, body.policy)
    result = await manager.grade(task, body.submission, policy=body.policy, reward=body.reward, owner=owner)
    return JSONResponse(result.model_dump(mode="json"))


@router.get("/state", response_model=EpisodeState, tags=["Environment"],
            summary="State of a fresh episode (HTTP is stateless; use /ws for real episodes)")
async def state(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    return EpisodeState(backend=settings.backend, policy=settings.policy).model_dump()


# The probes answer GET and HEAD (load balancers and orchestrators use either), without a token.
@router.get("/health", tags=["Health"], summary="OpenEnv liveness probe")
@router.head("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    return {"status": "healthy"}


@router.get("/healthz", tags=["Health"], summary="Liveness: the process answers")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["Health"], summary="Readiness: not draining and a session slot free")
@router.head("/readyz", include_in_schema=False)
async def readyz(request: Request) -> Response:
    """200 `{"status": "ready"}`, or 503 `draining` / `full`: nothing more to an unknown caller
    (the probe needs no token and skips the Host check); the admin also gets the counts."""
    manager = _manager(request)
    status = "draining" if manager.draining else "ready" if manager.ready() else "full"
    body: dict[str, Any] = {"status": status}
    if tenant_of(request).admin:
        body.update(active_sessions=manager.active, max_sessions=manager.capacity)
    if status == "ready":
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": RETRY_AFTER_S})


@functools.cache
def schemas() -> dict[str, Any]:
    return {
        "action": CodeAction.model_json_schema(),
        "observation": CodeObservation.model_json_schema(),
        "state": EpisodeState.model_json_schema(),
    }


@router.get("/schema", tags=["Environment"], summary="JSON schemas of action, observation, state")
async def schema() -> dict[str, Any]:
    return schemas()


@functools.cache
def environment_metadata() -> dict[str, Any]:
    """OpenEnv's EnvironmentMetadata; the readme comes from the installed distribution."""
    readme: str | None = None
    author: str | None = None
    docs_url: str | None = None
    try:
        dist = importlib_metadata.metadata(DISTRIBUTION).json
        readme = str(dist.get("description") or "") or None
        author = str(dist.get("author") or dist.get("author_email") or "") or None
        urls = dist.get("project_url") or []
        for entry in [urls] if isinstance(urls, str) else urls:
            label, _, url = entry.partition(",")
            if label.strip().lower() in ("documentation", "docs", "homepage") and docs_url is None:
                docs_url = url.strip()
    except importlib_metadata.PackageNotFoundError:
        pass
    if not readme:
        path = Path(__file__).resolve().parents[2] / "README.md"
        readme = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    return {"name": ENV_NAME, "description": DESCRIPTION, "version": __version__,
            "readme_content": readme, "author": author, "documentation_url": docs_url}


@router.get("/metadata", tags=["Environment"], summary="Environment name, description, version")
async def environment_info() -> dict[str, Any]:
    return environment_metadata()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return await farm_metrics(request)  # in a farm, each sample names its replica
