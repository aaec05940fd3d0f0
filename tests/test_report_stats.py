"""Properties of the paired bootstrap and the spread over runs (adaptbank.report.stats)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptbank.report.stats import error_split, mean_sd, paired_bootstrap

hit_vectors = st.lists(st.integers(0, 1), min_size=1, max_size=60)


@settings(max_examples=30, deadline=None)
@given(hit_vectors)
def test_identical_hits_give_zero(hits: list[int]) -> None:
    assert paired_bootstrap(hits, list(hits), n=500) == (0.0, 0.0, 0.0)
    assert paired_bootstrap({"a": hits, "b": hits[::-1]}, {"a": hits, "b": hits[::-1]}, n=200) == (0.0, 0.0, 0.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 80), st.integers(0, 2**32 - 1))
def test_better_on_every_example_gives_an_interval_above_zero(n_ex: int, seed: int) -> None:
    assert paired_bootstrap([1] * n_ex, [0] * n_ex, n=500, seed=seed) == (1.0, 1.0, 1.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=10, max_size=60), st.integers(0, 2**32 - 1))
def test_never_worse_and_often_better_gives_an_interval_above_zero(b: list[bool], seed: int) -> None:
    """a is right wherever b is, and b is wrong on at least half of N >= 10 examples: a resample
    without any of b's errors has probability <= 2^-10 < 2.5%, so the 2.5th percentile is > 0."""
    if sum(b) > len(b) // 2:
        b = [not x for x in b]
    a = [1] * len(b)
    diff, lo, hi = paired_bootstrap(a, [int(x) for x in b], n=2000, seed=seed)
    assert diff == pytest.approx(1 - sum(b) / len(b)) and diff >= 0.5
    assert 0.0 < lo <= diff <= hi <= 1.0


def test_interval_width_shrinks_with_more_examples() -> None:
    """Same hit rates (a 80%, b 70%, independent errors), 50 -> 200 -> 800 examples: the width falls
    roughly as 1/sqrt(N) (each step halves it; asked: below 0.7x)."""
    rng = random.Random(0)
    widths = []
    for n_ex in (50, 200, 800):
        a = [int(rng.random() < 0.8) for _ in range(n_ex)]
        b = [int(rng.random() < 0.7) for _ in range(n_ex)]
        _, lo, hi = paired_bootstrap(a, b, n=4000, seed=1)
        widths.append(hi - lo)
    print("interval widths at 50/200/800 examples:", [round(w, 4) for w in widths])
    assert widths[1] < 0.7 * widths[0] and widths[2] < 0.7 * widths[1], widths


def test_deterministic_for_a_seed_and_seed_sensitive() -> None:
    rng = random.Random(3)
    a = [int(rng.random() < 0.6) for _ in range(100)]
    b = [int(rng.random() < 0.55) for _ in range(100)]
    assert paired_bootstrap(a, b, n=3000, seed=7) == paired_bootstrap(a, b, n=3000, seed=7)
    assert paired_bootstrap(a, b, n=3000, seed=7)[1:] != paired_bootstrap(a, b, n=3000, seed=8)[1:]


def test_pairing_narrows_the_interval_against_unpaired_resampling() -> None:
    """b = a with 5 of 200 examples flipped to wrong: the paired difference is small and sure (an
    interval inside [0, 0.06]); resampling a and b independently would give a width near 0.2."""
    rng = random.Random(5)
    a = [int(rng.random() < 0.7) for _ in range(200)]
    ones = [i for i, x in enumerate(a) if x][:5]
    b = [0 if i in ones else x for i, x in enumerate(a)]
    diff, lo, hi = paired_bootstrap(a, b, n=4000)
    assert diff == pytest.approx(5 / 200) and 0.0 < lo and hi <= 0.06, (diff, lo, hi)


def test_per_task_hits_give_the_acc_difference() -> None:
    """Stratified: the statistic is the mean over tasks of per-task accuracy differences (ACC), so a
    small task weighs as much as a large one."""
    a = {"big": [1] * 90 + [0] * 10, "small": [1] * 10}
    b = {"big": [1] * 90 + [0] * 10, "small": [0] * 10}
    diff, lo, hi = paired_bootstrap(a, b, n=1000)
    assert diff == pytest.approx(0.5)  # (0 + 1) / 2, not 10 / 110
    assert lo == hi == pytest.approx(0.5)  # big: identical; small: always +1


@pytest.mark.parametrize(("a", "b", "message"), [
    ([1, 0], [1], "equal length"),
    ([1, 2], [1, 0], "0 or 1"),
    ({"x": [1]}, {"y": [1]}, "same non-empty set of tasks"),
    ({"x": [1]}, [1], "both be vectors"),
    ([], [], "non-empty"),
])  # fmt: skip
def test_bad_inputs_are_named(a, b, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b, n=10)
    with pytest.raises(ValueError, match="positive integer"):
        paired_bootstrap([1], [1], n=0)


def test_mean_sd_is_the_sample_sd() -> None:
    mean, sd, n = mean_sd([0.5, 0.7, None, 0.9])
    assert n == 3 and mean == pytest.approx(0.7) and sd == pytest.approx(0.2)  # ddof = 1
    assert mean_sd([0.4]) == (0.4, None, 1) and mean_sd([None]) == (None, None, 0)
    assert math.isclose(mean_sd([2.0, 2.0])[1], 0.0)  # type: ignore[arg-type]


def test_error_split_counts_the_four_outcomes() -> None:
    split = error_split([1, 1, 0, 0, 1], [1, 0, 1, 0, 0])
    assert split == {"n": 5, "both_right": 1, "routing_errors": 2, "routed_only_right": 1, "both_wrong": 1}
    with pytest.raises(ValueError, match="same examples"):
        error_split([1], [1, 0])
