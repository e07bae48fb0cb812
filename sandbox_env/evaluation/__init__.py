"""The evaluation harness: samples.jsonl in, per-sample results and pass@k out.

`harness` (the API and summary), `run` (endpoints, scheduling, retries, failover), `files`
(input formats, resume, result rows), `passk` (the unbiased estimator)."""

from sandbox_env.evaluation.harness import (
    STATUSES,
    EvalReport,
    EvaluationInputError,
    InputError,
    estimate_pass_at_k,
    evaluate,
    evaluate_async,
    result_row,
    summarize,
    verdict,
)

__all__ = ["STATUSES", "EvalReport", "EvaluationInputError", "InputError", "estimate_pass_at_k", "evaluate",
           "evaluate_async", "result_row", "summarize", "verdict"]
