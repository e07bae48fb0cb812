"""SandboxFusion-compatible endpoints: `POST /run_code` and `POST /submit` (docs/rl.md).

A client of SandboxFusion (verl's `sandbox_fusion` reward, its tools) switches to sandbox-env by
changing the URL: same request and reply fields, status strings and semantics; our extras sit in
the reply's `sandbox_env` field. Auth as on every route (`Authorization: Bearer`, or `?token=` in
the URL for clients that cannot add headers, verl among them). Each request is a one-shot on a
warm kernel (`EpisodeManager.one_shot`, as `POST /grade`), counted toward capacity and quotas.

- `schema`: the request and reply models.
- `run_code`: one run: limits, the program, the mapping of outcomes.
- `submit`: the datasets `/submit` evaluates, code extraction, the stdio comparison.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response

from sandbox_env import languages
from sandbox_env.errors import CapacityError, KernelError, LanguageUnavailableError
from sandbox_env.server.guard import tenant_of
from sandbox_env.server.routes import RETRY_AFTER_S, JSONResponse
from sandbox_env.server.sandboxfusion import run_code as runs
from sandbox_env.server.sandboxfusion import submit as submits
from sandbox_env.server.sandboxfusion.schema import (
    SUPPORTED_LANGUAGES,
    EvalResult,
    EvalTestCase,
    RunCodeRequest,
    RunCodeResponse,
    RunStatus,
    SubmitRequest,
)

if TYPE_CHECKING:
    from sandbox_env.manager import EpisodeManager

router = APIRouter(tags=["SandboxFusion"])
# SandboxFusion's clients retry a 504 only (verl: 3 times, 1 s then 2 s apart); a full server says
# so with 504 on these routes (503 elsewhere), Retry-After and our usual detail.
BUSY_STATUS = 504
_RESPONSES: dict[int | str, dict[str, Any]] = {
    BUSY_STATUS: {"description": "At capacity, over a quota, or draining: retry (see Retry-After)"},
    422: {"description": "A malformed request (the message names the field)"},
}


def _busy(exc: CapacityError) -> Response:
    return JSONResponse({"detail": jsonable_encoder(exc.to_dict())}, status_code=BUSY_STATUS,
                        headers={"Retry-After": RETRY_AFTER_S})


def _manager(request: Request) -> EpisodeManager:
    manager: EpisodeManager = request.app.state.manager
    return manager


@router.post("/run_code", response_model=RunCodeResponse, responses=_RESPONSES,
             summary="Run one program, SandboxFusion's request and reply")
async def run_code(request: Request, body: RunCodeRequest) -> Response:
    if body.language not in SUPPORTED_LANGUAGES:
        return JSONResponse(runs.unsupported_language(body.language).model_dump(mode="json"))
    runs.check_files(body.files, body.fetch_files)
    manager = _manager(request)
    policy = manager.policy(body.policy)
    language = languages.canonical(body.language)
    limits = runs.limits_for(policy, body.run_timeout, body.memory_limit_MB,
                             body.compile_timeout if languages.get(language).compiled else None)
    try:
        async with manager.one_shot(policy.name, tenant_of(request).name, language=language) as lease:
            reply = await runs.run(lease.kernel, body.code, stdin=body.stdin, files=body.files,
                                   fetch=body.fetch_files, limits=limits, language=language)
            lease.keep = reply.status is not RunStatus.SANDBOX_ERROR
    except CapacityError as exc:
        return _busy(exc)
    except LanguageUnavailableError as exc:  # known, but this host lacks its image or toolchain
        reply = runs.unsupported_language(body.language, exc.message)
    except KernelError as exc:  # no kernel could be had: SandboxFusion's answer for a failed sandbox
        reply = runs.sandbox_error(exc, policy, limits)
    return JSONResponse(reply.model_dump(mode="json"))


@router.post("/submit", response_model=EvalResult, responses={400: {"description": "A dataset or form this "
             "server does not evaluate (the message says what is supported)"}, **_RESPONSES},
             summary="Evaluate a completion: this server's tasks, or a CommonOJ row sent inline")
async def submit(request: Request, body: SubmitRequest) -> Response:
    manager = _manager(request)
    owner = tenant_of(request).name
    kind = submits.dataset_kind(body.dataset, body.config)
    try:
        if kind == submits.OWN_DATASET:
            result = await _submit_task(manager, body, owner)
        else:
            result = await _submit_stdio(manager, body, owner)
    except CapacityError as exc:
        return _busy(exc)
    return JSONResponse(result.model_dump(mode="json"))


async def _submit_task(manager: EpisodeManager, body: SubmitRequest, owner: str) -> EvalResult:
    code, kind = submits.extract_code(body.completion, body.config.language)
    manager.admit_grading(owner)
    task = manager.resolve_task(str(body.id), None, body.policy)
    grading = await manager.grade(task, code, policy=body.policy, owner=owner)
    return submits.graded_result(body.id, code, kind, grading)


async def _submit_stdio(manager: EpisodeManager, body: SubmitRequest, owner: str) -> EvalResult:
    cases = submits.stdio_cases(body.config)
    asked = body.config.language or "python"
    code, kind = submits.extract_code(body.completion, asked)
    if asked not in SUPPORTED_LANGUAGES:
        raise submits.SubmitError(runs.unsupported_language(asked).message)
    language = languages.canonical(asked)
    policy = manager.policy(body.policy)
    compiles = languages.get(language).compiled
    limits = runs.limits_for(policy, body.config.run_timeout or submits.STDIO_RUN_TIMEOUT_S, -1,
                             (body.config.compile_timeout or languages.COMPILE_TIMEOUT_S) if compiles else None)
    run_all = bool(body.config.extra.get("run_all_cases", False))
    tests: list[EvalTestCase] = []
    try:
        async with manager.one_shot(policy.name, owner, language=language) as lease:
            for case in cases:  # in order, on one kernel: each run starts from a clean slate
                reply = await runs.run(lease.kernel, code, stdin=case.input["stdin"], files={}, fetch=[],
                                       limits=limits, language=language)
                passed = submits.case_passed(reply, case)
                tests.append(EvalTestCase(passed=passed, exec_info=reply, test_info=case.model_dump()))
                if reply.status is RunStatus.SANDBOX_ERROR:
                    lease.keep = False
                    break
                if not passed and not run_all:
                    break
    except KernelError as exc:  # while the kernel was being taken
        tests.append(EvalTestCase(passed=False, exec_info=submits.kernel_failure(exc)))
    accepted = len(tests) == len(cases) and all(t.passed for t in tests)
    return EvalResult(id=body.id, accepted=accepted, extracted_code=code, extracted_type=kind,
                      tests=tests)
