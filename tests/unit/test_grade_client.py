"""The one `/grade` client (`client/grading.post_grade`): its request is the server's own model,
and every error says the HTTP status the evaluation harness sorts by. The server side is played
by httpx's MockTransport; the real server's /grade is tested in tests/grading and tests/evaluation."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import ValidationError

from sandbox_env.client.grading import post_grade
from sandbox_env.errors import ClientError, QuotaError, SandboxEnvError
from sandbox_env.models import GradeRequest

GRADED = {"task_id": "t", "status": "graded", "reward": 1.0, "passed": 1, "total": 1, "tests": []}


def client(handler: httpx.MockTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=handler)


async def test_the_body_is_the_request_model_without_nulls() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=GRADED)

    async with client(httpx.MockTransport(handler)) as http:
        grading = await post_grade(http, "http://s/grade", GradeRequest(task_id="t", submission="x = 1"))
    assert grading.reward == 1.0 and seen == [{"task_id": "t", "submission": "x = 1"}]


def test_the_model_refuses_what_the_server_would() -> None:
    with pytest.raises(ValidationError):
        GradeRequest(task_id="t" * 256, submission="")
    with pytest.raises(ValidationError):
        GradeRequest(task_id="t", submission="", surplus=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(("reply", "kind", "status"), [
    (httpx.Response(429, json={"detail": QuotaError("gradings", 2, 2).to_dict()}), QuotaError, 429),
    (httpx.Response(502, text="bad gateway"), ClientError, 502),
    (httpx.Response(200, json={"not": "a grading"}), ClientError, 200),
    # details that do not fit the code's class: still an error with its status, for the harness to sort
    (httpx.Response(503, json={"detail": {"code": "draining", "active_sessions": "n/a"}}), SandboxEnvError, 503),
    (httpx.Response(403, json={"detail": {"code": "kernel_error", "self": 1}}), SandboxEnvError, 403),
])
async def test_every_answered_error_carries_its_status(reply: httpx.Response, kind: type, status: int) -> None:
    async with client(httpx.MockTransport(lambda request: reply)) as http:
        with pytest.raises(kind) as caught:
            await post_grade(http, "http://s/grade", GradeRequest(task_id="t", submission=""))
    assert caught.value.details["status"] == status


async def test_an_unreached_server_has_no_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with client(httpx.MockTransport(handler)) as http:
        with pytest.raises(ClientError) as caught:
            await post_grade(http, "http://s/grade", GradeRequest(task_id="t", submission=""))
    assert "status" not in caught.value.details
