"""`POST /grade/batch`: many submissions in one request, one NDJSON line back per item as it finishes.

Lines (`models.BatchLine`): `{"type": "result", "index", "id", "grading"}` for every item graded
(an infrastructure failure is a Grading with `status="infra_error"`, `retryable`), `{"type":
"error", "index", "id", "error": {"code", "message", "status"}}` for an item whose task or reward
policy the server refuses, then one `{"type": "summary", "summary": {...}}`. A malformed request,
an unknown policy or more than `batch_max_items` items are refused before the stream starts
(422, 413). The gradings share the server's slots with everyone else's (`batching.FairGate`);
when the client goes away, the batch's remaining gradings are cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from sandbox_env.batching import FairGate, Tally, describe, plan, run_batch
from sandbox_env.errors import DrainingError, SandboxEnvError
from sandbox_env.models import BatchRequest, BatchSummary, Grading
from sandbox_env.server.guard import tenant_of
from sandbox_env.server.routes import JSONResponse, json_dumps

if TYPE_CHECKING:
    from sandbox_env.manager import EpisodeManager

router = APIRouter()
MEDIA_TYPE = "application/x-ndjson"


class NdjsonStream(StreamingResponse):
    """A stream that stops as soon as the client disconnects, whatever ASGI version the server
    speaks (Starlette watches for it only below 2.4), and always closes its iterator: that is
    what cancels the gradings nobody will read."""

    media_type = MEDIA_TYPE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the connection is gone: the listener ends too
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def gate_of(request: Request) -> FairGate:
    """The app's one gate, made on first use (it needs the manager, built in the lifespan)."""
    state = request.app.state
    manager: EpisodeManager = state.manager
    gate: FairGate | None = getattr(state, "batch_gate", None)
    if gate is None or gate.manager is not manager:
        gate = state.batch_gate = FairGate(manager)
    return gate


@router.post("/grade/batch", tags=["Environment"], response_class=StreamingResponse,
             responses={200: {"content": {MEDIA_TYPE: {}}, "description": "One JSON line per item as it "
                              "finishes, then a summary line (see BatchLine)"},
                        413: {"description": "More items than batch_max_items"},
                        422: {"description": "A malformed request, or a policy this server does not offer"}},
             summary="Grade many submissions; results stream back as NDJSON, one line per item")
async def grade_batch(request: Request, body: BatchRequest) -> Response:
    manager: EpisodeManager = request.app.state.manager
    settings = request.app.state.settings
    if len(body.items) > settings.batch_max_items:
        return JSONResponse({"detail": {"code": "payload_too_large", "message": f"{len(body.items)} items: a batch "
                                        f"carries at most {settings.batch_max_items} (batch_max_items); split it"}},
                            status_code=413)
    if manager.draining:
        raise DrainingError(manager.active, manager.capacity)
    policy = manager.policy(body.policy).name  # an unknown one is refused before anything streams
    # off the event loop: validating a thousand inline tasks takes a fraction of a second
    units = await asyncio.to_thread(plan, manager, body.items, policy, body.reward)
    parallel = min(body.parallel or settings.batch_parallel or manager.capacity, settings.batch_parallel or manager.capacity)
    owner = tenant_of(request).name
    gate = gate_of(request)

    async def lines() -> AsyncIterator[bytes]:
        started = time.perf_counter()
        summary = BatchSummary(items=len(body.items), deduplicated=len(body.items) - len(units))
        tally = Tally()
        results = run_batch(manager, gate, units, owner=owner, policy=policy, parallel=parallel, tally=tally)
        try:
            async for unit, outcome in results:
                for index in unit.indices:
                    _count(summary, outcome)
                    yield (json_dumps(_line(index, body.items[index].id, outcome)) + "\n").encode()
        finally:
            await results.aclose()
        summary.gradings = tally.gradings
        summary.wall_time_s = round(time.perf_counter() - started, 3)
        yield (json_dumps({"type": "summary", "summary": summary.model_dump(mode="json")}) + "\n").encode()

    return NdjsonStream(lines(), headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _line(index: int, label: str | int | None, outcome: Grading | SandboxEnvError) -> dict[str, Any]:
    """An item's line (`models.BatchLine`); the Grading whole, None fields included (reward None
    is what says "not a verdict")."""
    line: dict[str, Any] = {"type": "result" if isinstance(outcome, Grading) else "error", "index": index}
    if label is not None:
        line["id"] = label
    if isinstance(outcome, Grading):
        line["grading"] = outcome.model_dump(mode="json")
    else:
        line["error"] = describe(outcome)
    return line


def _count(summary: BatchSummary, outcome: Grading | SandboxEnvError) -> None:
    if not isinstance(outcome, Grading):
        summary.errors += 1
    elif outcome.status == "graded":
        summary.graded += 1
    else:
        summary.infra_errors += 1
