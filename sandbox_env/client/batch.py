"""The one `POST /grade/batch` call: items in, NDJSON lines out as the server finishes them.

Used by `SandboxEnv.grade_batch`, `code_reward` (sandbox_env.client.trl) and the evaluation
harness's remote endpoints."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any

import httpx
from pydantic import ValidationError

from sandbox_env.client.grading import reply_error
from sandbox_env.errors import ClientError
from sandbox_env.models import BatchItem, BatchLine, BatchRequest

ItemLike = BatchItem | Mapping[str, Any]


def batch_request(items: Iterable[ItemLike], *, policy: str | None = None, reward: str | None = None,
                  parallel: int | None = None) -> BatchRequest:
    """A request from items given as `BatchItem`s or dicts (`submission` and `task_id`, or `task`:
    a dict or a `Task`)."""
    parsed = []
    for item in items:
        if not isinstance(item, BatchItem):
            item = dict(item)
            if hasattr(item.get("task"), "model_dump"):
                item["task"] = item["task"].model_dump(mode="json")
            item = BatchItem.model_validate(item)
        parsed.append(item)
    return BatchRequest(items=parsed, policy=policy, reward=reward, parallel=parallel)


async def stream_batch(http: httpx.AsyncClient, url: str, request: BatchRequest) -> AsyncGenerator[BatchLine, None]:
    """`request` sent to `url` (a server's `/grade/batch`); each line as it arrives, the summary
    last. Raises the service's own error (with `details["status"]`) when the server refuses the
    batch, and `ClientError` when it cannot be reached or the stream ends before its summary.
    Leaving the loop early closes the connection: the server cancels the rest."""
    payload = request.model_dump(mode="json", exclude_none=True)
    try:
        async with http.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                await response.aread()
                raise reply_error(url, response)
            summary = False
            async for text in response.aiter_lines():
                if not text.strip():
                    continue
                try:
                    line = BatchLine.model_validate(json.loads(text))
                except (ValueError, ValidationError) as exc:
                    raise ClientError(f"POST {url}: a line that is not a BatchLine: {exc}", url=url, status=200) from exc
                summary = line.type == "summary"
                yield line
            if not summary:
                raise ClientError(f"POST {url}: the stream ended before its summary line", url=url)
    except httpx.HTTPError as exc:
        raise ClientError(f"POST {url} failed: {type(exc).__name__}: {exc}", url=url) from exc
