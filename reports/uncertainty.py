"""Uncertainty of the leaderboard: bootstrap intervals and paired ties with the best method.

Intervals are 95% percentile-bootstrap intervals of a mean, clipped to the metric's range
(``core.spec.METRICS``):

* accuracy, where the records carry per-sample correctness: a two-level bootstrap that
  resamples the seeds and, within them, the test samples (the same resampled samples for
  every method of a group, so comparisons are paired). It stays meaningful with one seed
  (then it covers test-set sampling only) and with two or three;
* every other metric: a bootstrap over the seeds' values (no interval with one seed).

``tied_with_best``: a method is tied with the best learned method of its group when the
95% bootstrap interval of the paired difference (best minus method; same seeds, same
resampled test samples) contains 0. All draws come from generators seeded by the group,
so a report is reproducible.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from core.spec import metric_spec

RESAMPLES = 2000
LEVEL = 0.95
GROUP = ["dataset", "missing_rate", "workload"]


def metric_range(metric: str) -> tuple[float | None, float | None]:
    """(low, high) bounds of ``metric`` (None = unbounded)."""
    try:
        spec = metric_spec(metric)
    except KeyError:  # a statistic of its own (e.g. an area): unbounded
        return (None, None)
    return spec.low, spec.high


def group_rng(*key: object) -> np.random.Generator:
    """A generator seeded by ``key`` (the same group always draws the same resamples)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def percentile_interval(resampled: np.ndarray, metric: str):
    """The central ``LEVEL`` interval of bootstrap statistics (over the first axis), clipped
    to the metric's range: two floats, or two arrays for statistics with more axes."""
    tail = (1.0 - LEVEL) / 2.0 * 100.0
    bounds = np.percentile(resampled, [tail, 100.0 - tail], axis=0)
    low, high = metric_range(metric)
    if low is not None:
        bounds = np.maximum(bounds, low)
    if high is not None:
        bounds = np.minimum(bounds, high)
    lo, hi = bounds
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def seed_resamples(values: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """(RESAMPLES, ...) bootstrap means over the first axis (seeds); None for one seed."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    draw = rng.integers(0, len(values), size=(RESAMPLES, len(values)))
    return values[draw].mean(axis=1)


def seed_interval(values: np.ndarray, metric: str, *key: object) -> tuple[float, float]:
    """Bootstrap-over-seeds interval of the mean of ``values`` (one per seed), drawn by
    ``group_rng(*key)`` and clipped to ``metric``'s range; NaN for a single seed."""
    resampled = seed_resamples(values, group_rng(*key))
    return (np.nan, np.nan) if resampled is None else percentile_interval(resampled, metric)


def sample_weights(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """(RESAMPLES, N) bootstrap weights of the test samples (multinomial counts / N)."""
    counts = rng.multinomial(num_samples, np.full(num_samples, 1.0 / num_samples), size=RESAMPLES)
    return counts.astype(np.float32) / num_samples


def accuracy_resamples(correct: np.ndarray, draws: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(RESAMPLES,) accuracy under resampled seeds and samples.

    correct: (S, N) 0/1 per seed and test sample; draws: (RESAMPLES, S') indices into
    the S seeds; weights: (RESAMPLES, N) sample weights. Any per-sample values whose mean is
    the statistic may stand in for the 0/1 outcomes.
    """
    per_seed = weights @ correct.astype(np.float32).T  # (RESAMPLES, S): each seed's accuracy
    return np.take_along_axis(per_seed, draws, axis=1).mean(axis=1)


def seed_draw(num_seeds: int, rng: np.random.Generator) -> np.ndarray:
    """(RESAMPLES, S) resampled seed indices (all 0 for a single seed)."""
    if num_seeds == 1:
        return np.zeros((RESAMPLES, 1), dtype=np.int64)
    return rng.integers(0, num_seeds, size=(RESAMPLES, num_seeds))


def accuracy_intervals(correct: pd.DataFrame, group: list[str] = GROUP) -> pd.DataFrame:
    """Two-level bootstrap intervals of accuracy per (group, decision, method).

    ``correct`` has the ``group`` columns (default dataset, missing_rate, workload), method,
    seed, decision and ``correct`` (a 0/1 array per test sample). Returns the keys with
    ``lo`` and ``hi``.
    """
    rows = []
    for key, part in correct.groupby([*group, "decision", "method"], sort=True):
        rng = group_rng(*key)
        matrix = np.stack(part.sort_values("seed")["correct"].to_list())
        resampled = accuracy_resamples(matrix, seed_draw(len(matrix), rng),
                                       sample_weights(matrix.shape[1], rng))
        rows.append([*key, *percentile_interval(resampled, "accuracy")])
    return pd.DataFrame(rows, columns=[*group, "decision", "method", "lo", "hi"])


def _paired_difference(best: pd.DataFrame, other: pd.DataFrame, rng: np.random.Generator,
                       weights: np.ndarray | None) -> np.ndarray | None:
    """Bootstrap of (best - other) over their common seeds (and samples, if given)."""
    seeds = sorted(set(best["seed"]) & set(other["seed"]))
    if not seeds:
        return None
    draw = seed_draw(len(seeds), rng)
    if weights is not None:
        def stat(rows):
            matrix = np.stack(rows.set_index("seed").loc[seeds, "correct"].to_list())
            return accuracy_resamples(matrix, draw, weights)
        return stat(best) - stat(other)
    if len(seeds) < 2:
        return None
    difference = (best.set_index("seed").loc[seeds, "value"].to_numpy(float)
                  - other.set_index("seed").loc[seeds, "value"].to_numpy(float))
    return difference[draw].mean(axis=1)


def ties_with_best(values: pd.DataFrame, best: pd.DataFrame, higher_is_better: bool,
                   correct: pd.DataFrame | None = None, group: list[str] = GROUP) -> pd.DataFrame:
    """``tied_with_best`` per (group, method) of the learned methods.

    values: per-seed values of the primary metric (the ``group`` columns, method, seed,
    value); best: the best method per group (``group`` + ``method``); correct: per-sample
    values whose mean is the metric (0/1 correctness for accuracy; any per-sample
    contributions of a mean) when they exist (else None: a paired bootstrap over seeds).
    True for the best itself; NaN when no paired test is possible.
    """
    rows = []
    width = len(group)
    best_of = {tuple(row[:width]): row[width] for row in best[[*group, "method"]].itertuples(index=False)}
    source = correct if correct is not None else values
    for key, part in source.groupby(group, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        leader = best_of.get(key)
        if leader is None:
            continue
        rng = group_rng("ties", *key)
        weights = None
        if correct is not None:
            weights = sample_weights(len(part["correct"].iloc[0]), rng)
        leader_rows = part[part["method"] == leader]
        for method, rows_of in part.groupby("method"):
            if method == leader:
                rows.append([*key, method, True])
                continue
            difference = _paired_difference(leader_rows, rows_of, rng, weights)
            if difference is None:
                rows.append([*key, method, np.nan])
                continue
            if not higher_is_better:
                difference = -difference
            tail = (1.0 - LEVEL) / 2.0 * 100.0
            rows.append([*key, method, bool(np.percentile(difference, tail) <= 0.0)])
    return pd.DataFrame(rows, columns=[*group, "method", "tied_with_best"])
