"""The evaluation harness: samples.jsonl in, per-sample results and pass@k out.

`harness` (the API and summary), `run` (endpoints, scheduling, retries, failover), `files`
(input formats, resume, result rows), `passk` (the unbiased estimator)."""

from sandbox_env.evaluation import harness as _harness
from sandbox_env.evaluation.harness import *  # noqa: F403  (the package's API is the harness's)

__all__ = _harness.__all__
