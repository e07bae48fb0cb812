"""Docker extras (issue #8, item 1), complementing tests/docker/test_channel.py (pid 1's fds 0-2,
mem, environ) and test_untrusted_worker.py (the worker's own result pipe):

* nothing of any process in the container outside the episode's own tree opens: every fd of the
  supervisor and of the zygote, their mem, environ, cwd, root (signal 0 is a documented limit:
  the same uid may signal, see docs/docker.md, Known limits);
* frames written into every fd that opens for writing, of every other process, never become a
  step's result or a reward: at worst the container is retired and the request is retryable.

`/proc/<grader>/mem` during a grading is `test_attacks.py::test_the_grader_is_unreachable_from_the_submission`.
"""

from __future__ import annotations

import pytest
from security_helpers import (
    GOOD_SQUARE,
    MACHINERY,
    SQUARE_TASK,
    WRONG_SQUARE,
    KernelFactory,
    parse,
    parse_report,
    probe_code,
    require_backend,
    run_probe,
    token,
)

from sandbox_env.errors import KernelError
from sandbox_env.grading.driver import grade

pytestmark = [pytest.mark.docker]


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    require_backend("docker", request)
    return "docker"


async def test_nothing_of_the_supervisor_or_the_zygote_opens(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    report = await run_probe(kernel, "sweep", {"skip": MACHINERY})
    assert report["self"]["visible_processes"] >= 3, report["self"]  # supervisor, zygote, this worker
    reached = {f"{p['pid']} {p['comm']}": {k: v for k, v in p.items() if k not in ("pid", "comm", "fingerprint", "cgroup", "signal0")}
               for p in report["processes"]}
    reached = {who: what for who, what in reached.items() if what}
    assert not reached, f"the episode opened what belongs to the sandbox's own processes: {reached}"


async def test_frames_written_into_reachable_fds_are_never_results(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    forged = token("forged")
    frame = {"op": "result", "id": 1, "seq": 1, "status": "ok", "exit_code": 42, "stdout": forged,
             "tests": [{"name": "check", "status": "passed"}], "hardened": True}
    outcomes = []
    try:
        result = await kernel.execute(probe_code("forge_frames", {"frame": frame}))
        outcomes.append((result.status.value, result.exit_code, result.stdout[-300:]))
        report = parse_report(result.stdout)
        assert report is not None and report.get("tried", 0) > 0, f"the forger did not run: {result}"
    except KernelError as exc:
        assert exc.retryable, exc
        outcomes.append(("retryable", None, str(exc)))
    for attempt in range(2):  # a retired container costs one retryable error, then a fresh one serves
        try:
            after = await kernel.execute(f"print('real-{attempt}')")
        except KernelError as exc:
            assert exc.retryable, exc
            outcomes.append(("retryable", None, str(exc)))
            continue
        outcomes.append((after.status.value, after.exit_code, after.stdout))
        assert after.stdout == f"real-{attempt}\n" and after.exit_code == 0, outcomes
    assert all(forged not in str(o) and o[1] != 42 for o in outcomes), f"a forged frame became a result: {outcomes}"
    good = await grade(kernel, parse(SQUARE_TASK), GOOD_SQUARE)
    wrong = await grade(kernel, parse(SQUARE_TASK), WRONG_SQUARE)
    assert good.reward in (1.0, None) and (good.reward is not None or good.retryable), good
    assert wrong.reward in (0.0, None) and (wrong.reward is not None or wrong.retryable), wrong
