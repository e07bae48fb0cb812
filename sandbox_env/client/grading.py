"""The one `POST /grade` call, used by `SandboxEnv.grade` and by the evaluation harness's remote
endpoints (which keep one HTTP client per run and sort the errors into retry, failover or stop)."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import ValidationError

from sandbox_env.errors import ClientError, SandboxEnvError, error_from_dict
from sandbox_env.models import GradeRequest, Grading


async def post_grade(http: httpx.AsyncClient, url: str, request: GradeRequest) -> Grading:
    """`request` sent to `url` (a server's `/grade`). Raises `ClientError` without a `status`
    detail when the server was not reached; otherwise every error carries `details["status"]`,
    the HTTP status: the service's own error rebuilt from the reply, or a `ClientError`."""
    try:
        response = await http.post(url, json=request.model_dump(mode="json", exclude_none=True))
    except httpx.HTTPError as exc:
        raise ClientError(f"POST {url} failed: {type(exc).__name__}: {exc}", url=url) from exc
    if response.status_code == 200:
        try:
            return Grading.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise ClientError(f"POST {url}: a reply that is not a Grading: {exc}", url=url, status=200) from exc
    raise reply_error(url, response)


def reply_error(url: str, response: httpx.Response) -> SandboxEnvError:
    detail: Any
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, dict):
        error = error_from_dict(detail)
        error.details["status"] = response.status_code
        return error
    return ClientError(f"POST {url}: HTTP {response.status_code}: {str(detail or response.text)[:2000]}",
                       status=response.status_code)
