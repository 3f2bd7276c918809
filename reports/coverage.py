"""Accuracy at equal coverage (the Prob-L2D paper's Table 1 and Fig. 3).

A *coverage sweep* is every record whose workload differs from its preset by a coverage
target ``workload.coverage = c`` (and nothing else that varies with c): at each target
every method's test decisions send exactly ``round(c N)`` samples to the classifier. A
*group* is (dataset, missing rate, workload family), the family being the workload label
without the target (``none[coverage=0.3]`` -> ``none``). Every method of a group is read
on the group's common grid of targets:

* **per target** (``target_table``): constrained accuracy, mean over seeds with a 95%
  two-level bootstrap interval (seeds x test samples), the realised coverage, the rank of
  the learned methods and ``tied_with_best`` (paired bootstrap);
* **equal-coverage AUC** (``area_table``): the trapezoid of accuracy over the grid (on
  [0, 1] when the grid spans it), the same for every method, so a method more accurate at
  every target has the larger area. Its interval and ties come from the same bootstrap:
  the area is a weighted sum of per-sample outcomes, ``sum_c w_c correct[c, i]`` averaged
  over samples and seeds. A method lacking a target of the grid gets no area (its row says
  how many targets it has).

Reference rows (role ``reference``) are listed apart and never ranked.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from core.labels import variant_label
from reports.frames import cell_of, ok_records
from reports.uncertainty import (
    GROUP, accuracy_intervals, accuracy_resamples, group_rng, percentile_interval, sample_weights,
    seed_draw, seed_interval, ties_with_best,
)

TARGET = "coverage"  # the workload setting a coverage sweep varies
AREA_NAME = "equal-coverage AUC"
AREA_SENTENCE = (
    "equal-coverage AUC: area under constrained accuracy against the coverage target, every "
    "method decided (and, where its training uses the workload, trained) at each target of "
    "one common grid; trapezoid over that grid")
DEFERRAL_AUC_SENTENCE = (
    "deferral_auc: area under one trained model's own accuracy-coverage curve, traced by "
    "ranking its test samples on classifier-vs-best-human score (nothing retrained, no "
    "capacity); it compares score orderings, not systems at equal coverage")
POINT_COLUMNS = [*GROUP, "method", "seed", "target", "coverage", "accuracy", "correct"]
TARGET_COLUMNS = [*GROUP, "method", "role", "target", "accuracy", "accuracy_lo", "accuracy_hi",
                  "coverage", "coverage_error", "n", "rank", "tied_with_best"]
AREA_COLUMNS = [*GROUP, "method", "role", "auc", "auc_lo", "auc_hi", "targets", "grid_targets",
                "grid", "n", "rank", "tied_with_best"]


def target_of(record: dict) -> tuple[str, float] | None:
    """(workload family, coverage target) of a coverage-sweep record, else None."""
    changes = dict((record.get("variant") or {}).get("workload") or {})
    target = changes.pop(TARGET, None)
    if target is None:
        return None
    name = str(record["cell"]["workload"]).split("[")[0]
    return variant_label(name, changes), float(target)


def coverage_points(records: Iterable[dict], decision: str = "constrained") -> pd.DataFrame:
    """One row per coverage-sweep record: group, method, seed, target, realised coverage,
    accuracy under ``decision`` and ``correct`` (0/1 per test sample, None if absent)."""
    rows = []
    for record in ok_records(records):
        found = target_of(record)
        if found is None:
            continue
        family, target = found
        cell = cell_of(record)
        metrics = record["metrics"][decision]
        flags = (record.get("correct") or {}).get(decision)
        correct = None if flags is None else np.frombuffer(flags.encode(), np.uint8) - ord("0")
        rows.append([cell["dataset"], cell["missing_rate"], family, cell["method"], cell["seed"],
                     target, float(metrics["coverage"]), float(metrics["accuracy"]), correct])
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


def trapezoid_weights(grid: np.ndarray) -> np.ndarray:
    """Weights ``w`` with ``sum_c w_c f(c)`` = the trapezoid of f over the sorted ``grid``."""
    grid = np.asarray(grid, dtype=float)
    if len(grid) < 2:
        return np.zeros(len(grid))
    gaps = np.diff(grid)
    return np.concatenate([[gaps[0] / 2], (gaps[:-1] + gaps[1:]) / 2, [gaps[-1] / 2]])


def _grid_text(grid: np.ndarray) -> str:
    return ",".join(f"{c:g}" for c in grid)


def _used_seeds(part: pd.DataFrame, grid: np.ndarray) -> tuple[list[int], bool]:
    """The seeds that have every target of ``grid`` (complete), or all seeds if none has."""
    targets = part.groupby("seed")["target"].apply(set)
    complete = [seed for seed, have in targets.items() if set(grid) <= have]
    return (sorted(complete), True) if complete else (sorted(targets.index), False)


def _roles(methods: Iterable[str], roles: dict[str, str] | None) -> dict[str, str]:
    return {method: (roles or {}).get(method, "method") for method in methods}


def _rank_and_ties(table: pd.DataFrame, value: str, group: list[str], per_seed: pd.DataFrame,
                   contributions: pd.DataFrame | None) -> pd.DataFrame:
    """Rank the learned rows of ``table`` by ``value`` (higher is better) per ``group`` and
    mark ``tied_with_best`` by the paired bootstrap of ``reports.uncertainty``."""
    learned = (table["role"] == "method") & table[value].notna()
    table = table.assign(rank=table[value].where(learned).groupby(
        [table[k] for k in group]).rank(method="min", ascending=False).astype("Int64"))
    best = table[table["rank"] == 1].drop_duplicates(group)
    names = set(table.loc[learned, "method"])
    ties = ties_with_best(per_seed[per_seed["method"].isin(names)], best, higher_is_better=True,
                          correct=None if contributions is None
                          else contributions[contributions["method"].isin(names)], group=group)
    return table.merge(ties, on=[*group, "method"], how="left")


def _ordered(table: pd.DataFrame, group: list[str], columns: list[str]) -> pd.DataFrame:
    """Learned rows by rank, then the reference rows, per group."""
    table = table.assign(_reference=table["role"] != "method").sort_values(
        [*group, "_reference", "rank", "method"], na_position="last")
    return table.drop(columns="_reference").reset_index(drop=True)[columns]


def target_table(points: pd.DataFrame, roles: dict[str, str] | None = None) -> pd.DataFrame:
    """Per (group, target, method): mean constrained accuracy over the seeds the area uses,
    its 95% interval, mean realised coverage and its largest distance from the target,
    rank among learned methods and ``tied_with_best``."""
    if points.empty:
        return pd.DataFrame(columns=TARGET_COLUMNS)
    used = []
    for key, part in points.groupby([*GROUP, "method"], sort=True):
        grid = np.sort(points[_in_group(points, key[:3])]["target"].unique())
        seeds, _ = _used_seeds(part, grid)
        used.append(part[part["seed"].isin(seeds)])
    points = pd.concat(used, ignore_index=True)
    group = [*GROUP, "target"]
    rows = []
    for key, part in points.groupby([*group, "method"], sort=True):
        error = (part["coverage"] - part["target"]).abs().max()
        rows.append([*key, part["accuracy"].mean(), part["coverage"].mean(), error, len(part)])
    table = pd.DataFrame(rows, columns=[*group, "method", "accuracy", "coverage", "coverage_error", "n"])
    table["role"] = table["method"].map(_roles(table["method"], roles))
    per_seed = points.rename(columns={"accuracy": "value"})
    correct = points.dropna(subset=["correct"])
    has_samples = len(correct) == len(points)
    if has_samples:
        intervals = accuracy_intervals(correct.assign(decision="constrained"), group)
        table = table.merge(intervals.drop(columns="decision").rename(
            columns={"lo": "accuracy_lo", "hi": "accuracy_hi"}), on=[*group, "method"], how="left")
    else:  # records without per-sample outcomes: a bootstrap over seeds
        bounds = {key: seed_interval(part["value"].to_numpy(), "accuracy", *key)
                  for key, part in per_seed.groupby([*group, "method"], sort=True)}
        table["accuracy_lo"] = [bounds[key][0] for key in zip(*(table[k] for k in [*group, "method"]))]
        table["accuracy_hi"] = [bounds[key][1] for key in zip(*(table[k] for k in [*group, "method"]))]
    table = _rank_and_ties(table, "accuracy", group, per_seed, correct if has_samples else None)
    return _ordered(table, [*GROUP, "target"], TARGET_COLUMNS)


def _in_group(frame: pd.DataFrame, key: tuple) -> np.ndarray:
    mask = np.ones(len(frame), dtype=bool)
    for column, value in zip(GROUP, key):
        mask &= (frame[column] == value).to_numpy()
    return mask


def area_table(points: pd.DataFrame, roles: dict[str, str] | None = None) -> pd.DataFrame:
    """Equal-coverage AUC per (group, method): mean over seeds of the trapezoid of accuracy
    over the group's common grid of targets, its 95% interval (seeds x test samples), the
    number of targets the method has, rank among learned methods and ``tied_with_best``.
    A method without every target of the grid gets no area (NaN), no rank."""
    if points.empty:
        return pd.DataFrame(columns=AREA_COLUMNS)
    rows, per_seed, contributions = [], [], []
    for group_key, group_part in points.groupby(GROUP, sort=True):
        grid = np.sort(group_part["target"].unique())
        weights = trapezoid_weights(grid)
        for method, part in group_part.groupby("method", sort=True):
            seeds, complete = _used_seeds(part, grid)
            have = part["target"].nunique()
            if not complete:
                rows.append([*group_key, method, np.nan, np.nan, np.nan, have, len(grid),
                             _grid_text(grid), 0])
                continue
            by_point = part.set_index(["seed", "target"])
            values, samples = [], []
            for seed in seeds:
                accuracy = by_point.loc[[(seed, c) for c in grid], "accuracy"].to_numpy(float)
                values.append(float(weights @ accuracy))
                per_seed.append([*group_key, method, seed, values[-1]])
                outcomes = by_point.loc[[(seed, c) for c in grid], "correct"].to_list()
                if all(o is not None for o in outcomes) and len({len(o) for o in outcomes}) == 1:
                    samples.append(weights @ np.stack(outcomes).astype(float))
                    contributions.append([*group_key, method, seed, samples[-1]])
            if len(samples) == len(seeds):  # two-level bootstrap over seeds and samples
                matrix = np.stack(samples)
                rng = group_rng("area", *group_key, method)
                resampled = accuracy_resamples(matrix, seed_draw(len(seeds), rng),
                                               sample_weights(matrix.shape[1], rng))
                lo, hi = percentile_interval(resampled, "accuracy")
            else:
                lo, hi = seed_interval(np.asarray(values), "accuracy", "area", *group_key, method)
            rows.append([*group_key, method, float(np.mean(values)), lo, hi, have, len(grid),
                         _grid_text(grid), len(seeds)])
    table = pd.DataFrame(rows, columns=[*GROUP, "method", "auc", "auc_lo", "auc_hi", "targets",
                                        "grid_targets", "grid", "n"])
    table["role"] = table["method"].map(_roles(table["method"], roles))
    per_seed_frame = pd.DataFrame(per_seed, columns=[*GROUP, "method", "seed", "value"])
    contribution_frame = pd.DataFrame(contributions, columns=[*GROUP, "method", "seed", "correct"])
    paired = contribution_frame if len(contribution_frame) == len(per_seed_frame) else None
    table = _rank_and_ties(table, "auc", GROUP, per_seed_frame, paired)
    return _ordered(table, GROUP, AREA_COLUMNS)


def _marked(value: float, rank, tied, decimals: int = 3) -> str:
    """``*0.912`` best, ``=0.905`` tied with the best, `` 0.801`` otherwise."""
    if pd.isna(value):
        return "–"
    mark = ("*" if not pd.isna(rank) and rank == 1
            else "=" if not pd.isna(tied) and bool(tied) else " ")
    return f"{mark}{value:.{decimals}f}"


def coverage_blocks(area: pd.DataFrame, targets: pd.DataFrame):
    """Per group: (dataset, missing_rate, workload, table of display strings) with one row per
    method (learned by area rank, then references): rank, method, the equal-coverage AUC with
    its interval, then the accuracy at every target (``*`` best, ``=`` tied with the best)."""
    for key, rows in area.groupby(GROUP, sort=False):
        at = targets[_in_group(targets, key)]
        grid = sorted(at["target"].unique())
        lookup = {(r.method, r.target): r for r in at.itertuples(index=False)}
        shown = []
        for row in rows.itertuples(index=False):
            reference = row.role != "method"
            if pd.isna(row.auc):
                area_text = f"incomplete ({row.targets} of {row.grid_targets} targets)"
            else:
                interval = "" if pd.isna(row.auc_lo) else f" [{row.auc_lo:.3f}, {row.auc_hi:.3f}]"
                area_text = f"{_marked(row.auc, row.rank, row.tied_with_best)}{interval}".strip()
            cells = []
            for c in grid:
                point = lookup.get((row.method, c))
                cells.append("–" if point is None else
                             _marked(point.accuracy, point.rank, point.tied_with_best).strip()
                             if not reference else f"{point.accuracy:.3f}")
            shown.append(["ref" if reference else "–" if pd.isna(row.rank) else str(int(row.rank)),
                          row.method, area_text, *cells, str(row.n)])
        columns = ["rank", "method", AREA_NAME, *(f"c={c:g}" for c in grid), "n"]
        yield (*key, pd.DataFrame(shown, columns=columns))
