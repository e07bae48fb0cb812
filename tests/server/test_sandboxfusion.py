"""SandboxFusion-compatible `/run_code` and `/submit` on a real server (uvicorn on loopback, the
backend from SANDBOX_ENV_BACKEND, default jupyter).

`data/sandboxfusion_cases.json` holds the request/response cases: pass, wrong answer, runtime
error, timeout, compile error, memory limit, output limit, unsupported language, bad requests.
Each reply is checked field by field against SandboxFusion's schema, and through `verl_code`: the
per-case code verl's `sandbox_fusion` reward derives from the fields it reads (docs/rl.md).
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from sandbox_env.server.sandboxfusion.schema import EvalResult, RunCodeResponse

HERE = Path(__file__).resolve().parent
CASES = json.loads((HERE / "data" / "sandboxfusion_cases.json").read_text())["cases"]
CATEGORIES = {"pass", "wrong_answer", "runtime_error", "timeout", "compile_error", "memory_limit", "output_limit"}
TIMEOUT_S = 120.0

_spec = importlib.util.spec_from_file_location("_tests_root_conftest", HERE.parent / "conftest.py")
assert _spec is not None and _spec.loader is not None
_root = sys.modules.get("_tests_root_conftest") or importlib.util.module_from_spec(_spec)
if "_tests_root_conftest" not in sys.modules:
    sys.modules["_tests_root_conftest"] = _root
    _spec.loader.exec_module(_root)

SQUARE_TASK = {"id": "sq", "prompt": "Write square(x).\n",
               "tests": {"kind": "function", "entry_point": "square",
                         "check": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "tasks.jsonl").write_text(json.dumps(SQUARE_TASK) + "\n")
    with _root.run_live_server(max_sessions=8, allowed_policies=["default", "strict"], tasks=str(folder)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=TIMEOUT_S) as client:
        yield client


def verl_code(reply: dict[str, Any], expected: str | None) -> bool | int:
    """What verl 0.9's `_process_single_case` makes of a reply (its documented decision, from the
    fields it reads): True/False, or -1 sandbox/unknown error, -2 runtime error, -3 timeout,
    -4 compile error."""
    status, compiled, run = reply.get("status"), reply.get("compile_result"), reply.get("run_result")
    if status == "SandboxError":
        return -1
    if status == "Failed":
        if compiled and (compiled.get("status") in ("Error", "TimeLimitExceeded")
                         or (compiled.get("status") == "Finished" and compiled.get("return_code") != 0)):
            return -4
        if run:
            if run.get("status") == "TimeLimitExceeded":
                return -3
            if run.get("status") == "Error" or (run.get("status") == "Finished" and run.get("return_code") != 0):
                return -2
        return -1
    if status == "Success":
        if run and run.get("status") == "Finished":
            out = run.get("stdout") or ""
            return expected is None or out.rstrip("\n") == str(expected).rstrip("\n")
        return -1
    return -1


def test_fixture_covers_every_category() -> None:
    assert len(CASES) >= 50
    assert CATEGORIES <= {case["category"] for case in CASES}
    assert len({case["name"] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c['category']}:{c['name']}" for c in CASES])
def test_run_code_case(http: httpx.Client, case: dict[str, Any]) -> None:
    expect = case["expect"]
    response = http.post("/run_code", json=case["request"])
    assert response.status_code == expect["http"], response.text
    reply = response.json()
    if expect["http"] != 200:
        assert expect["detail_contains"] in json.dumps(reply["detail"]), reply
        return
    RunCodeResponse.model_validate(reply)  # SandboxFusion's fields, nothing missing
    assert set(reply) >= {"status", "message", "compile_result", "run_result", "executor_pod_name", "files"}
    assert reply["status"] == expect["status"], reply
    compiled = reply["compile_result"]
    if "compile_status" in expect:  # a compiled language: its compile stage comes first
        assert compiled["status"] == expect["compile_status"], reply
        assert compiled["return_code"] == expect.get("compile_return_code", compiled["return_code"]), reply
        assert expect.get("compile_stderr_contains", "") in (compiled["stderr"] or ""), reply
    elif case["request"]["language"] not in ("c", "cpp"):
        assert compiled is None  # no compile stage (Python, Node.js, Bash), in SandboxFusion either
    run = reply["run_result"]
    extras = reply["sandbox_env"]
    if "run_result" in expect:
        assert run is expect["run_result"] is None
    else:
        assert set(run) == {"status", "execution_time", "return_code", "stdout", "stderr"}
        assert isinstance(run["execution_time"], float) and run["execution_time"] > 0
        assert run["status"] == expect.get("run_status", run["status"])
        if run["status"] == "TimeLimitExceeded":
            assert run["return_code"] is None
        else:
            assert run["status"] == "Finished"
            assert (run["return_code"] == 0) == (reply["status"] == "Success"), reply
        if "return_code" in expect:
            assert run["return_code"] == expect["return_code"], reply
        if "stdout" in expect:
            assert run["stdout"] == expect["stdout"], reply
        if "stderr_contains" in expect:
            assert expect["stderr_contains"] in run["stderr"], reply
        if "stdout_max_bytes" in expect:
            assert len(run["stdout"].encode()) <= expect["stdout_max_bytes"]
    if "message_contains" in expect:
        assert expect["message_contains"] in reply["message"]
    else:
        assert reply["message"] == ""  # SandboxFusion says nothing for Success and Failed
    assert reply["files"] == expect.get("files", {})
    for key in ("outcome", "clamped", "run_timeout_s", "memory_limit_mb", "stdout_truncated", "policy",
                "compile_timeout_s"):
        if key in expect:
            assert extras[key] == expect[key], (key, extras)
    assert extras["retryable"] is False
    if "verl" in expect:
        assert verl_code(reply, expect.get("expected_output")) == expect["verl"], reply


def test_run_code_token_in_url_as_verl_sends_it(server: Any) -> None:
    """verl posts to the configured URL with only Content-Type and Accept headers: the token
    travels in the URL."""
    token = server.headers["Authorization"].removeprefix("Bearer ")
    body = json.dumps({"code": "print(input())", "stdin": "x", "language": "python", "compile_timeout": 10,
                       "run_timeout": 10, "memory_limit_MB": 1024, "files": {}, "fetch_files": []})
    plain = {"Content-Type": "application/json", "Accept": "application/json"}
    refused = httpx.post(f"{server.url}/run_code", content=body, headers=plain, timeout=TIMEOUT_S)
    assert refused.status_code == 401
    reply = httpx.post(f"{server.url}/run_code?token={token}", content=body, headers=plain, timeout=TIMEOUT_S)
    assert reply.status_code == 200 and reply.json()["run_result"]["stdout"] == "x\n"
    wrong = httpx.post(f"{server.url}/run_code?token=not-the-token-0123456789", content=body, headers=plain,
                       timeout=TIMEOUT_S)
    assert wrong.status_code == 401


def test_run_code_runs_share_nothing(http: httpx.Client) -> None:
    """Each run starts clean, as in SandboxFusion: a file or a process left by one is not seen by
    the next (same tenant, so the same stashed kernel)."""
    first = http.post("/run_code", json={"language": "python", "code": (
        "import subprocess\nopen('left.txt', 'w').write('x')\n"
        "subprocess.Popen(['sleep', '86124'], start_new_session=True)\nprint('ok')")}).json()
    assert first["status"] == "Success"
    second = http.post("/run_code", json={"language": "python", "code": (
        "import os\nprint(os.path.exists('left.txt'))\n"
        "print(any(b'86124' in open(f'/proc/{p}/cmdline', 'rb').read() for p in os.listdir('/proc') "
        "if p.isdigit() and os.path.exists(f'/proc/{p}/cmdline')))")}).json()
    assert second["run_result"]["stdout"] == "False\nFalse\n", second


STDIO_ROW = {"id": 7, "content": "Double a number.", "test": [
    {"input": {"stdin": "2\n"}, "output": {"stdout": "4\n"}},
    {"input": {"stdin": "2.5\n"}, "output": {"stdout": "5.000001\n"}},  # within 1e-5, relative
    {"input": {"stdin": "yes\n"}, "output": {"stdout": "YESYES"}},  # lower-cased, stripped
]}
DOUBLE = "Here it is:\n```python\nx = input().strip()\ntry:\n    v = float(x)\n    print(int(v * 2) if v.is_integer() " \
         "else v * 2)\nexcept ValueError:\n    print(x * 2)\n```\n"


def submit(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/submit", json={"dataset": "my_oj", "id": 7, "config": {}, **body})


def test_submit_common_oj_inline_row_accepted(http: httpx.Client) -> None:
    config = {"dataset_type": "CommonOJDataset", "language": "python", "provided_data": STDIO_ROW}
    response = submit(http, completion=DOUBLE, config=config)
    assert response.status_code == 200, response.text
    result = EvalResult.model_validate(response.json())
    assert result.accepted and result.id == 7 and result.extracted_type == "fenced"
    assert result.extracted_code.startswith("x = input()")
    assert [t.passed for t in result.tests] == [True, True, True]
    assert result.tests[0].exec_info.run_result is not None
    assert result.tests[0].exec_info.run_result.stdout == "4\n"
    assert result.tests[2].test_info == STDIO_ROW["test"][2]


C_DOUBLE = "```c\n#include <stdio.h>\nint main(void){long x;scanf(\"%ld\",&x);printf(\"%ld\\n\",2*x);}\n```\n"


def test_submit_common_oj_in_c_compiles_per_case(http: httpx.Client) -> None:
    row = {"id": 8, "test": [{"input": {"stdin": "2\n"}, "output": {"stdout": "4\n"}},
                             {"input": {"stdin": "21\n"}, "output": {"stdout": "42\n"}}]}
    config = {"dataset_type": "CommonOJDataset", "language": "c", "provided_data": row}
    result = EvalResult.model_validate(submit(http, completion=C_DOUBLE, config=config).json())
    assert result.accepted and [t.passed for t in result.tests] == [True, True], result
    compiled = result.tests[0].exec_info.compile_result
    assert compiled is not None and compiled.return_code == 0
    broken = EvalResult.model_validate(submit(http, completion="```c\nint main( {}\n```", config=config).json())
    assert not broken.accepted and len(broken.tests) == 1
    info = broken.tests[0].exec_info
    assert info.run_result is None and info.compile_result is not None and info.compile_result.return_code != 0


def test_submit_common_oj_stops_at_first_failure(http: httpx.Client) -> None:
    config = {"dataset_type": "CommonOJDataset", "language": "python", "provided_data": STDIO_ROW}
    wrong = "```python\nprint(input())\n```"
    first = EvalResult.model_validate(submit(http, completion=wrong, config=config).json())
    assert not first.accepted and [t.passed for t in first.tests] == [False]
    assert first.tests[0].exec_info.status.value == "Success"  # it ran; the answer was wrong
    every = EvalResult.model_validate(submit(http, completion=wrong, config={**config, "extra": {
        "run_all_cases": True}}).json())
    assert [t.passed for t in every.tests] == [False, False, False]
    crash = EvalResult.model_validate(submit(http, completion="```python\n1/0\n```", config=config).json())
    assert not crash.accepted and crash.tests[0].exec_info.status.value == "Failed"
    assert "ZeroDivisionError" in (crash.tests[0].exec_info.run_result.stderr or "")  # type: ignore[union-attr]


def test_submit_own_task(http: httpx.Client) -> None:
    good = http.post("/submit", json={"dataset": "sandbox_env", "id": "sq", "config": {},
                                      "completion": "```python\ndef square(x):\n    return x * x\n```"})
    assert good.status_code == 200, good.text
    result = EvalResult.model_validate(good.json())
    assert result.accepted and len(result.tests) == 1 and result.tests[0].passed
    assert result.extra is not None and result.extra["sandbox_env"]["reward"] == 1.0
    bad = EvalResult.model_validate(http.post("/submit", json={
        "dataset": "sandbox_env", "id": "sq", "config": {},
        "completion": "def square(x):\n    return x + x\n"}).json())
    assert not bad.accepted and bad.extracted_type == "heuristic"
    assert bad.tests[0].exec_info.status.value == "Failed" and bad.extra is not None
    assert bad.extra["sandbox_env"]["reward"] == 0.0


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"dataset": "humaneval_python", "config": {}}, 400, "no eval class found for dataset 'humaneval_python'"),
    ({"dataset": "code_contests", "config": {"language": "python"}}, 400, "send the row in config.provided_data"),
    ({"dataset": "x", "config": {"dataset_type": "CommonOJDataset", "provided_data": STDIO_ROW}}, 400,
     "config.language field must exist"),
    ({"dataset": "x", "config": {"dataset_type": "CommonOJDataset", "language": "go", "provided_data": STDIO_ROW}},
     400, "language 'go' is not available"),
    ({"dataset": "x", "config": {"dataset_type": "CommonOJDataset", "language": "python",
                                 "provided_data": {"test": [{"input": {"a.txt": "1"}, "output": {"stdout": "1"}}]}}},
     400, "input.stdin and output.stdout"),
    ({"dataset": "x", "config": {"dataset_type": "CommonOJDataset", "language": "python",
                                 "custom_extract_logic": "submit_code_blocks([])", "provided_data": STDIO_ROW}},
     400, "custom_extract_logic is not supported"),
    ({"dataset": "sandbox_env", "id": "no-such-task", "config": {}}, 404, "no task 'no-such-task'"),
    ({"dataset": "sandbox_env", "config": {"run_timeout": -1}}, 422, "run_timeout"),
])
def test_submit_refusals_say_why(http: httpx.Client, body: dict[str, Any], status: int, fragment: str) -> None:
    response = http.post("/submit", json={"id": body.pop("id", 1), "completion": "print(1)", **body})
    assert response.status_code == status, response.text
    assert fragment in json.dumps(response.json()["detail"]), response.text


async def test_run_code_at_capacity_answers_504(live_server_factory: Any) -> None:
    """SandboxFusion's clients retry 504 only: a full server says 504 with Retry-After here."""
    live = live_server_factory(max_sessions=1)
    url = live.url.replace("http://", "ws://") + "/ws"
    async with connect(url, additional_headers=live.headers) as ws:
        await ws.send(json.dumps({"type": "reset", "data": {}}))
        assert json.loads(await ws.recv())["type"] == "observation"
        async with httpx.AsyncClient(base_url=live.url, headers=live.headers, timeout=TIMEOUT_S) as client:
            busy = await client.post("/run_code", json={"code": "print(1)", "language": "python"})
            assert busy.status_code == 504 and busy.headers["retry-after"]
            assert busy.json()["detail"]["code"] == "capacity_reached"
    async with httpx.AsyncClient(base_url=live.url, headers=live.headers, timeout=TIMEOUT_S) as client:
        for _ in range(600):  # the session's slot frees once the server has closed it
            reply = await client.post("/run_code", json={"code": "print(2)", "language": "python"})
            if reply.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert reply.json()["run_result"]["stdout"] == "2\n"


def test_files_round_trip_binary(http: httpx.Client) -> None:
    blob = bytes(range(256)) * 4
    reply = http.post("/run_code", json={
        "language": "python", "files": {"in.bin": base64.b64encode(blob).decode()}, "fetch_files": ["out.bin"],
        "code": "data = open('in.bin', 'rb').read()\nopen('out.bin', 'wb').write(data[::-1])"}).json()
    assert reply["status"] == "Success"
    assert base64.b64decode(reply["files"]["out.bin"]) == blob[::-1]


def test_run_code_compiles_as_python_does(http: httpx.Client) -> None:
    """No future import of ours leaks into the code: annotations are evaluated, as `python x.py` does."""
    reply = http.post("/run_code", json={"language": "python", "code": "def f(a: int): pass\n"
                                         "x: print('evaluated') = 1\nprint(f.__annotations__['a'] is int)"}).json()
    assert reply["status"] == "Success" and reply["run_result"]["stdout"] == "evaluated\nTrue\n", reply


STOPS_ITS_PARENT = r"""
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static char state(pid_t p) {  /* from /proc/<p>/stat: Z once it exited */
    char b[256], path[64]; snprintf(path, 64, "/proc/%d/stat", p);
    FILE *f = fopen(path, "r"); if (!f) return 'X';
    size_t n = fread(b, 1, 255, f); fclose(f); b[n] = 0;
    char *q = strrchr(b, ')'); return q ? q[2] : 'X';
}
int main(void) {
    pid_t parent = getppid(), me = getpid();
    if (fork() == 0) {  /* resumes the parent once the program has exited */
        setsid();
        while (state(me) != 'Z' && state(me) != 'X') usleep(1000);
        kill(parent, SIGCONT); _exit(0);
    }
    kill(parent, SIGSTOP);  /* the stage's watcher cannot see its deadline pass */
    sleep(2);
    puts("42");
    return 0;
}
"""


def test_a_program_that_stops_its_watcher_still_exceeds_its_time(http: httpx.Client) -> None:
    """Found by a red team: the program stopped the in-sandbox process timing it, ran past
    `run_timeout`, and was reported `Finished` with its output."""
    reply = http.post("/run_code", json={"language": "c", "code": STOPS_ITS_PARENT, "run_timeout": 1}).json()
    assert reply["status"] == "Failed" and reply["run_result"]["status"] == "TimeLimitExceeded", reply


LEAVES_A_STOPPER = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    pid_t watcher = getppid(), me = getpid();
    if (fork() == 0) {
        setsid();  /* out of the stage's group */
        while (kill(me, 0) == 0 || errno != ESRCH) ;  /* until the stage is reaped */
        usleep(300); kill(watcher, SIGSTOP);  /* freeze the watcher once it measured the stage */
        time_t t0 = time(0);
        volatile unsigned long x = 0;
        while (time(0) - t0 < 2) x++;  /* work past run_timeout */
        printf("answer after the limit\n"); fflush(stdout);
        kill(watcher, SIGCONT);
        _exit(0);
    }
    return 0;
}
"""


def test_what_a_program_leaves_cannot_work_past_its_time_and_pass(http: httpx.Client) -> None:
    """Found by a red team: a process that left the stage's session waited for the stage to be
    reaped, stopped the watcher, worked past `run_timeout`, printed, and was reported Success."""
    for _ in range(3):
        reply = http.post("/run_code", json={"language": "c", "code": LEAVES_A_STOPPER, "run_timeout": 1}).json()
        run = reply["run_result"] or {}
        assert not (reply["status"] == "Success" and "answer" in (run.get("stdout") or "")), reply
