"""Stdio tasks in C, C++, Node.js, Bash and Rust, graded on both backends with real sandboxes:
per language a pass, a wrong answer, a runtime error, a timeout, and for the compiled ones a
compile error (typed `compile_error`, the compiler's message, reward 0). Docker runs each language
in its own image (`sandbox-env images build --all`); Jupyter runs the host's toolchain
(`scripts/test` installs both)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from grading_helpers import run_live_server

from sandbox_env import languages
from sandbox_env.errors import InvalidRequestError, LanguageUnavailableError
from sandbox_env.grading.tasks import parse_task
from sandbox_env.manager import EpisodeManager
from sandbox_env.models import CodeAction
from sandbox_env.settings import Settings

pytestmark = [pytest.mark.slow]
in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the manager fixture's loop

_EXE = shutil.which("sandbox-env")
CLI = [_EXE] if _EXE else [sys.executable, "-m", "sandbox_env.cli"]
CASES = [{"input": "1 2\n", "output": "3\n"}, {"input": "40 2\n", "output": "42\n"}]
# language -> (adds, off by one, fails at run time, loops forever, does not compile or None)
PROGRAMS = {
    "c": ('#include <stdio.h>\nint main(void){long a,b;scanf("%ld %ld",&a,&b);printf("%ld\\n",a+b);}\n',
          '#include <stdio.h>\nint main(void){long a,b;scanf("%ld %ld",&a,&b);printf("%ld\\n",a+b+1);}\n',
          'int main(void){volatile int *p = 0; return *p;}\n',
          'int main(void){for(;;);}\n',
          'int main(void){ return 0 }\n'),
    "cpp": ('#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<"\\n";}\n',
            '#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a-b<<"\\n";}\n',
            '#include <stdexcept>\nint main(){throw std::runtime_error("x");}\n',
            'int main(){for(;;){}}\n',
            '#include <string>\nint main(){int x = std::string("a");}\n'),
    "nodejs": ("const [a,b]=require('fs').readFileSync(0,'utf8').trim().split(/\\s+/).map(Number);console.log(a+b)",
               "console.log(0)", "throw new Error('no')", "for(;;){}", None),
    "bash": ("read a b\necho $((a+b))", "read a b\necho $((a*b))", "exit 3", "while :; do :; done", None),
    "rust": ('use std::io::Read;\nfn main(){let mut s=String::new();std::io::stdin().read_to_string(&mut s).unwrap();'
             'let v:Vec<i64>=s.split_whitespace().map(|x|x.parse().unwrap()).collect();println!("{}",v[0]+v[1]);}\n',
             'fn main(){println!("0");}\n', 'fn main(){let v: Vec<i32> = Vec::new(); println!("{}", v[1]);}\n',
             'fn main(){loop{}}\n', 'fn main(){ let x: i32 = "a"; }\n'),
}


def task(language: str) -> Any:
    # rustc -O alone takes seconds on a loaded 2-core machine: the compile limit is not what these test
    return parse_task({"id": f"add-{language}", "prompt": "Print the sum of two integers.", "timeout_s": 2,
                       "tests": {"kind": "stdio", "language": language, "cases": CASES, "compile_timeout_s": 60}})


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["jupyter", "docker"])
async def manager(request: pytest.FixtureRequest) -> AsyncIterator[EpisodeManager]:
    if request.param == "docker":
        request.getfixturevalue("require_docker")
    mgr = EpisodeManager(Settings(backend=request.param, pool_size=0))
    await mgr.start()
    try:
        yield mgr
    finally:
        await mgr.shutdown()


@in_module_loop
@pytest.mark.parametrize("language", sorted(PROGRAMS))
async def test_each_outcome_of_a_language(manager: EpisodeManager, language: str) -> None:
    good, wrong, crashes, loops, broken = PROGRAMS[language]
    passed = await manager.grade(task(language), good)
    assert (passed.reward, [t.status.value for t in passed.tests]) == (1.0, ["passed", "passed"]), passed
    failed = await manager.grade(task(language), wrong)
    assert failed.reward == 0.0 and failed.tests[0].status.value == "failed", failed
    assert "wrong answer on case 0" in failed.tests[0].message
    crashed = await manager.grade(task(language), crashes)
    assert crashed.reward == 0.0 and {t.status.value for t in crashed.tests} == {"error"}, crashed
    assert crashed.tests[0].message.startswith("exit code ")
    slow = await manager.grade(task(language), loops)
    assert {t.status.value for t in slow.tests} == {"timeout"}, slow
    if broken is None:
        assert not languages.get(language).compiled
        return
    bad = await manager.grade(task(language), broken)
    assert bad.status == "graded" and bad.reward == 0.0
    assert {t.status.value for t in bad.tests} == {"compile_error"}, bad
    assert "compilation failed" in bad.tests[0].message and "error" in bad.tests[0].message
    assert "1 2" not in bad.tests[0].message  # the compiler never saw a test


@in_module_loop
async def test_python_is_still_the_default_and_runs_as_before(manager: EpisodeManager) -> None:
    plain = parse_task({"id": "p", "prompt": "sum", "tests": {"kind": "stdio", "cases": CASES}})
    assert plain.tests.language == "python"
    assert (await manager.grade(plain, "print(sum(map(int, input().split())))")).reward == 1.0
    assert "default" in manager.pool_stats()


@in_module_loop
async def test_a_compile_that_runs_too_long_is_a_compile_error(manager: EpisodeManager) -> None:
    slow = parse_task({"id": "slow", "prompt": "x", "tests": {
        "kind": "stdio", "language": "cpp", "compile_timeout_s": 1, "cases": CASES}})
    source = ("constexpr long f() { long s = 0; for (long i = 0; i < 200000; i++) for (long j = 0; j < 200000; j++)"
              " s += i ^ j; return s; }\nint main() { constexpr long x = f(); return x & 1; }\n")
    graded = await manager.grade(slow, source)
    assert [t.status.value for t in graded.tests] == ["compile_error", "compile_error"], graded
    assert graded.tests[0].message == "compilation ran past its 1 s limit"


@in_module_loop
async def test_each_language_has_a_pool_of_its_own(manager: EpisodeManager) -> None:
    await manager.grade(task("c"), PROGRAMS["c"][0])
    assert {"default+c"} <= set(manager.pool_stats())
    assert manager.language_policy(manager.default_policy, "c").memory_mb == manager.default_policy.memory_mb


@in_module_loop
async def test_a_missing_toolchain_names_how_to_add_it(manager: EpisodeManager) -> None:
    absent = languages.Language("zig", "main.zig", ("{dir}/main",), compile=("zig-not-installed",),
                                packages=("zig-not-packaged",), binaries=("zig-not-installed",))
    with pytest.raises(LanguageUnavailableError) as caught:
        await manager.kernel_class.check_language(absent)
    hint = "sandbox-env images build --language zig" if manager.settings.backend == "docker" else \
        "apt-get install zig-not-packaged"
    assert hint in caught.value.message and caught.value.http_status == 422


def test_sandbox_env_eval_scores_a_c_task_against_a_server(tmp_path: Path) -> None:
    """`sandbox-env eval --server`, unchanged, on a C stdio task: the completion is the program."""
    c_task = {"id": "add-c", "prompt": "Print the sum of two integers.",
              "tests": {"kind": "stdio", "language": "c", "cases": CASES}}
    (tmp_path / "tasks.jsonl").write_text(json.dumps(c_task) + "\n")
    good, wrong, _, _, broken = PROGRAMS["c"]
    rows = [good, good, wrong, broken]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"task_id": "add-c", "completion": c}) + "\n"
                                                    for c in rows))
    with run_live_server(max_sessions=4) as live:
        out = subprocess.run([*CLI, "eval", str(tmp_path / "samples.jsonl"), "--problems", str(tmp_path / "tasks.jsonl"),
                              "--k", "1", "--server", live.url], capture_output=True, text=True, timeout=300,
                             check=False, env={**os.environ, "SANDBOX_ENV_TOKEN": live.headers["Authorization"][7:]})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pass@1"] == pytest.approx(0.5)
    results = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, True, False, False], results
    assert "compile" in json.dumps(results[3])


@in_module_loop
async def test_an_episode_on_a_c_task_explores_in_python_and_grades_the_c_program(manager: EpisodeManager) -> None:
    """As TRL's environment does it: the steps are a Python scratchpad, the submit is the program."""
    episode = await manager.open_episode()
    try:
        task = {"id": "c-add", "prompt": "Add two numbers in C.",
                "tests": {"kind": "stdio", "language": "c", "cases": CASES}}
        good, wrong = PROGRAMS["c"][0], PROGRAMS["c"][1]
        for program, reward in ((wrong, 0.0), (good, 1.0)):
            assert "Add two numbers" in (await episode.reset(task=task)).stdout
            assert (await episode.step(CodeAction(code="print(2 + 3)"))).stdout == "5\n"
            with pytest.raises(InvalidRequestError, match="submit the program"):
                await episode.step(CodeAction(code="", submit=True))
            graded = await episode.step(CodeAction(code=program, submit=True))
            assert graded.reward == reward and graded.done, graded
    finally:
        await manager.close_episode(episode)
