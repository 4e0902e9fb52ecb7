"""pass@k against exact combinatorics."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qgpt_code.evals.passk import estimate_pass_at_k, pass_at_k, reportable_ks


def exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_small_n_c_k_match_math_comb_exactly():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert estimate_pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), abs=1e-12), (n, c, k)


@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_large_n_is_stable(nck):
    n, c, k = nck
    assert estimate_pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-9, abs=1e-12)


def test_known_values():
    assert estimate_pass_at_k(10, 0, 1) == 0.0
    assert estimate_pass_at_k(10, 10, 10) == 1.0
    assert estimate_pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert estimate_pass_at_k(200, 1, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        estimate_pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        estimate_pass_at_k(5, 1, 6)


def test_only_ks_every_task_has_samples_for_are_reported():
    counts = {"a": (10, 3), "b": (5, 0), "c": (12, 12)}
    assert reportable_ks([1, 5, 10, 100], [n for n, _ in counts.values()]) == [1, 5]
    scores = pass_at_k(counts, [1, 5, 10, 100])
    assert list(scores) == ["pass@1", "pass@5"]
    assert scores["pass@1"] == pytest.approx((0.3 + 0.0 + 1.0) / 3)
    assert scores["pass@5"] == pytest.approx((float(exact(10, 3, 5)) + 0.0 + 1.0) / 3)
    assert pass_at_k({}, [1]) == {}
