"""Statistics for comparing continual runs: a paired bootstrap over test examples, and a spread over runs.

**Paired bootstrap** (Efron & Tibshirani 1993, ch. 16; its use for comparing two systems on one test
set: Koehn 2004, "Statistical significance tests for machine translation evaluation", EMNLP). Given
per-example hits ``a[n], b[n] in {0, 1}`` of two strategies on the *same* test examples, draw
``n_resamples`` index vectors ``I`` of length N with replacement and compute, for each,

    d(I) = mean_{n in I} a[n] - mean_{n in I} b[n]

Both strategies are resampled with the same ``I`` (the pairing), so the per-example correlation
between them cancels out of the interval. The result is the observed difference ``d`` on all
examples and the 2.5 / 97.5 percentiles of ``d(I)``: a 95% percentile interval. An interval that
excludes 0 is what "clearly better" means in these reports.

With hits per task (``{task: [0/1, ...]}``) the resampling is stratified: every task's examples are
resampled within that task, and the statistic is the difference of ACC, the mean over tasks of the
per-task accuracy (GEM's ACC on the final row, :mod:`adaptbank.metrics`), so tasks of different
test-set sizes weigh equally, exactly as in ACC.

**Spread over runs**: ``mean_sd(values)`` gives the mean and the sample standard deviation
(``ddof = 1``; None for a single value) of one metric over runs of one strategy that differ in seed or
task order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["paired_bootstrap", "mean_sd", "error_split", "Hits"]

Hits = Sequence[float] | Mapping[str, Sequence[float]]
"""One 0/1 vector over test examples, or one per task (stratified, ACC-weighted)."""

_CHUNK = 1000  # resamples drawn at once: a (1000, N) index array, bounded memory for N up to ~1e5


def _vectors(hits_a: Hits, hits_b: Hits) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs of per-task hit vectors (one pair for plain vectors), checked for matching shapes."""
    if isinstance(hits_a, Mapping) != isinstance(hits_b, Mapping):
        raise ValueError("hits_a and hits_b must both be vectors or both be {task: vector} mappings")
    if isinstance(hits_a, Mapping) and isinstance(hits_b, Mapping):
        if set(hits_a) != set(hits_b) or not hits_a:
            raise ValueError(f"hits_a and hits_b must cover the same non-empty set of tasks, got "
                             f"{sorted(hits_a)} and {sorted(hits_b)}")
        pairs = [(str(t), hits_a[t], hits_b[t]) for t in sorted(hits_a)]
    else:
        pairs = [("hits", hits_a, hits_b)]  # type: ignore[list-item]
    out = []
    for name, a, b in pairs:
        va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if va.ndim != 1 or vb.ndim != 1 or va.shape != vb.shape or va.size == 0:
            raise ValueError(f"{name}: hit vectors must be non-empty, one-dimensional and of equal length "
                             f"(the same test examples), got shapes {va.shape} and {vb.shape}")
        if not (np.isin(va, (0.0, 1.0)).all() and np.isin(vb, (0.0, 1.0)).all()):
            raise ValueError(f"{name}: hits must be 0 or 1 per test example")
        out.append((va, vb))
    return out


def paired_bootstrap(hits_a: Hits, hits_b: Hits, n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap of ``acc(a) - acc(b)``: ``(observed difference, 2.5th pct, 97.5th pct)``.

    ``hits_a``/``hits_b``: 0/1 per test example for the same examples in the same order (or one such
    vector per task, resampled within each task; the statistic is then the mean over tasks of the
    per-task difference, i.e. the difference of ACC). ``n`` resamples drawn from
    ``numpy.random.default_rng(seed)``: the same inputs and seed give the same interval. Identical
    vectors give exactly ``(0.0, 0.0, 0.0)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of resamples) must be a positive integer, got {n!r}")
    pairs = _vectors(hits_a, hits_b)
    observed = math.fsum(float(a.mean() - b.mean()) for a, b in pairs) / len(pairs)
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n)  # (n,) resampled ACC differences
    for a, b in pairs:
        d = a - b  # (N,) per-example difference; resampling pairs == resampling d
        if not d.any():
            continue  # identical on this task: every resample adds exactly 0
        done = 0
        while done < n:
            k = min(_CHUNK, n - done)
            idx = rng.integers(0, d.size, size=(k, d.size))  # (k, N) resampled example indices
            diffs[done:done + k] += d[idx].mean(axis=1) / len(pairs)  # (k,)
            done += k
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return observed, float(lo), float(hi)


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample sd with ddof=1, count)`` over the non-None values; sd is None below two values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None, 1
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)), len(xs)


def error_split(oracle: Sequence[float], routed: Sequence[float]) -> dict[str, int]:
    """Counts of the four (oracle, routed) outcomes over the same test examples: ``both_right``,
    ``routing_errors`` (oracle right, routed wrong: the router picked badly), ``routed_only_right``
    and ``both_wrong`` (the expert itself is wrong; routing cannot be blamed)."""
    if len(oracle) != len(routed):
        raise ValueError(f"oracle has {len(oracle)} hits but routed has {len(routed)}; they must cover the same examples")
    pairs = [(bool(o), bool(r)) for o, r in zip(oracle, routed, strict=True)]
    return {"n": len(pairs), "both_right": pairs.count((True, True)), "routing_errors": pairs.count((True, False)),
            "routed_only_right": pairs.count((False, True)), "both_wrong": pairs.count((False, False))}
