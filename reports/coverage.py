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
  how many targets it has); a grid of one target has no area;
* **normalised area** (``nac_auc``, after the HAIC toolbox's nAC-AUC): where the group has
  the ``random`` and ``oracle`` reference rows, ``(auc - auc_random) / (auc_oracle -
  auc_random)``: 0 at random deferral at equal coverage, 1 at the oracle, comparable across
  datasets and missing rates; its interval comes from the same bootstrap draws as the areas.

Per-target numbers are computed exactly as the leaderboard computes the same cell (the
same seeds, the same bootstrap draws keyed by the cell's workload label), so a number and
its interval read the same in ``coverage_targets.csv`` and ``leaderboard.csv``. Reference
rows (role ``reference``) are listed apart and never ranked.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from core.labels import variant_label
from core.spec import REFERENCE
from reports.frames import Record, cell_of, natural_order, ok_records
from reports.uncertainty import (
    GROUP,
    LEVEL,
    accuracy_intervals,
    accuracy_resamples,
    group_rng,
    percentile_interval,
    sample_weights,
    seed_draw,
    seed_interval,
    ties_with_best,
)

TARGET = "coverage"  # the workload setting a coverage sweep varies
AREA_NAME = "equal-coverage AUC"
NORMALISED_NAME = "nAC-AUC"
RANDOM, ORACLE = "random", "oracle"  # the reference rows that span the normalised area
RANK_DECIMALS = 12  # as the leaderboard: equal results tie instead of ranking by the last bit
AREA_SENTENCE = (
    "equal-coverage AUC: area under constrained accuracy against the coverage target, every "
    "method decided (and, where its training uses the workload, trained) at each target of "
    "one common grid; trapezoid over that grid")
NORMALISED_SENTENCE = (
    "nAC-AUC: the same area normalised between random deferral at equal coverage (0) and the "
    "oracle (1), (AUC - AUC random) / (AUC oracle - AUC random), so that areas compare across "
    "datasets and missing rates; below 0 is worse than random")
DEFERRAL_AUC_SENTENCE = (
    "deferral_auc: area under one trained model's own accuracy-coverage curve, traced by "
    "ranking its test samples on classifier-vs-best-human score (nothing retrained, no "
    "capacity); it compares score orderings, not systems at equal coverage")
CELL = "cell_workload"  # the workload label of a sweep cell, e.g. none[coverage=0.3]
POINT_COLUMNS = [*GROUP, "method", "seed", "target", CELL, "coverage", "accuracy", "correct"]
TARGET_COLUMNS = [*GROUP, "method", "role", "target", "accuracy", "accuracy_lo", "accuracy_hi",
                  "coverage", "coverage_error", "n", "rank", "tied_with_best"]
AREA_COLUMNS = [*GROUP, "method", "role", "auc", "auc_lo", "auc_hi", "vs_best", "nac_auc",
                "nac_auc_lo", "nac_auc_hi", "targets", "grid_targets", "grid", "n", "rank",
                "tied_with_best"]


def target_of(record: Record) -> tuple[str, float] | None:
    """(workload family, coverage target) of a coverage-sweep record, else None."""
    changes = dict((record.get("variant") or {}).get("workload") or {})
    target = changes.pop(TARGET, None)
    if target is None:
        return None
    name = str(record["cell"]["workload"]).split("[")[0]
    return variant_label(name, changes), float(target)


def _outcomes(flags: str | None) -> np.ndarray | None:
    return None if not flags else np.frombuffer(flags.encode(), np.uint8) - ord("0")


def coverage_points(records: Iterable[Record], decision: str = "constrained") -> pd.DataFrame:
    """One row per coverage-sweep record: group, method, seed, target, the cell's workload
    label, realised coverage, accuracy under ``decision`` and ``correct`` (0/1 per test
    sample, None if absent). Records without that decision's accuracy are left out."""
    rows = []
    for record in ok_records(records):
        found = target_of(record)
        metrics = (record.get("metrics") or {}).get(decision) or {}
        if found is None or metrics.get("accuracy") is None:
            continue
        family, target = found
        cell = cell_of(record)
        coverage = metrics.get("coverage")
        rows.append([cell["dataset"], cell["missing_rate"], family, cell["method"], cell["seed"],
                     target, cell["workload"], np.nan if coverage is None else float(coverage),
                     float(metrics["accuracy"]),
                     _outcomes((record.get("correct") or {}).get(decision))])
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
    score = table[value].round(RANK_DECIMALS).where(learned)
    table = table.assign(rank=score.groupby([table[k] for k in group]).rank(
        method="min", ascending=False).astype("Int64"))
    best = table[table["rank"] == 1].sort_values("method").drop_duplicates(group)
    names = set(table.loc[learned, "method"])
    ties = ties_with_best(per_seed[per_seed["method"].isin(names)], best, higher_is_better=True,
                          correct=None if contributions is None
                          else contributions[contributions["method"].isin(names)], group=group)
    return table.merge(ties, on=[*group, "method"], how="left")


def _ordered(table: pd.DataFrame, group: list[str], columns: list[str]) -> pd.DataFrame:
    """Learned rows by rank, then the reference rows, per group (groups in natural order)."""
    table = table.assign(_reference=table["role"] != "method").sort_values(
        [*group, "_reference", "rank", "method"], na_position="last",
        key=lambda column: natural_order(column) if pd.api.types.is_string_dtype(column)
        else column)
    return table.drop(columns="_reference").reset_index(drop=True)[columns]


def _complete_seeds(points: pd.DataFrame) -> pd.DataFrame:
    """Per (group, method) the points of the seeds the area uses (``_used_seeds``)."""
    used = []
    for key, part in points.groupby([*GROUP, "method"], sort=True):
        grid = np.sort(points[_in_group(points, key[:3])]["target"].unique())
        seeds, _ = _used_seeds(part, grid)
        used.append(part[part["seed"].isin(seeds)])
    return pd.concat(used, ignore_index=True)


def target_table(points: pd.DataFrame, roles: dict[str, str] | None = None) -> pd.DataFrame:
    """Per (group, target, method): mean constrained accuracy over the seeds the area uses,
    its 95% interval, mean realised coverage and its largest distance from the target,
    rank among learned methods and ``tied_with_best``.

    Each target is a cell of the leaderboard (workload label ``family[coverage=c]``): its
    interval and tie come from the leaderboard's own bootstrap draws for that cell, so the
    two tables agree wherever the seeds agree."""
    if points.empty:
        return pd.DataFrame(columns=TARGET_COLUMNS)
    points = _complete_seeds(points)
    cell = ["dataset", "missing_rate", CELL]
    rows = []
    for key, part in points.groupby([*cell, "workload", "target", "method"], sort=True):
        error = (part["coverage"] - part["target"]).abs().max()
        rows.append([*key, part["accuracy"].mean(), part["coverage"].mean(), error, len(part)])
    table = pd.DataFrame(rows, columns=[*cell, "workload", "target", "method", "accuracy",
                                        "coverage", "coverage_error", "n"])
    table["role"] = table["method"].map(_roles(table["method"], roles))
    per_seed = points.rename(columns={"accuracy": "value"})
    correct = points.dropna(subset=["correct"])
    has_samples = len(correct) == len(points)
    if has_samples:  # the leaderboard's draws: keyed by (dataset, rate, cell label, decision, method)
        as_cells = correct.assign(decision="constrained", workload=correct[CELL])
        intervals = accuracy_intervals(as_cells[[*GROUP, "decision", "method", "seed", "correct"]])
        intervals = intervals.drop(columns="decision").rename(
            columns={"workload": CELL, "lo": "accuracy_lo", "hi": "accuracy_hi"})
        table = table.merge(intervals, on=[*cell, "method"], how="left")
    else:  # records without per-sample outcomes: a bootstrap over seeds
        bounds = {key: seed_interval(part["value"].to_numpy(), "accuracy", *key)
                  for key, part in per_seed.groupby([*cell, "method"], sort=True)}
        keys = list(zip(*(table[k] for k in [*cell, "method"])))
        table["accuracy_lo"] = [bounds[key][0] for key in keys]
        table["accuracy_hi"] = [bounds[key][1] for key in keys]
    table = _rank_and_ties(table, "accuracy", cell, per_seed, correct if has_samples else None)
    return _ordered(table, [*GROUP, "target"], TARGET_COLUMNS)


def _in_group(frame: pd.DataFrame, key: tuple) -> np.ndarray:
    mask = np.ones(len(frame), dtype=bool)
    for column, value in zip(GROUP, key):
        mask &= (frame[column] == value).to_numpy()
    return mask


def _reference_label(methods: Iterable[str], name: str, roles: dict[str, str]) -> str | None:
    """The label of reference row ``name`` among ``methods`` (the plain name first, else its
    only variant), None when absent or ambiguous."""
    references = [m for m in methods if roles.get(m) == REFERENCE]
    if name in references:
        return name
    variants = [m for m in references if m.split("[", 1)[0] == name]
    return variants[0] if len(variants) == 1 else None


def _normalised(table: pd.DataFrame, resampled: dict[tuple, np.ndarray],
                roles: dict[str, str]) -> pd.DataFrame:
    """``nac_auc`` (and its interval) per row: (auc - random's) / (oracle's - random's) in
    each group; the interval from the same resampled areas (NaN where a row, random or the
    oracle has no resampled areas, or the oracle is not above random)."""
    table = table.assign(nac_auc=np.nan, nac_auc_lo=np.nan, nac_auc_hi=np.nan)
    for key, rows in table.groupby(GROUP, sort=False):
        area = dict(zip(rows["method"], rows["auc"]))
        low, high = (_reference_label(area, name, roles) for name in (RANDOM, ORACLE))
        if low is None or high is None or not area[high] - area[low] > 0:
            continue
        span = area[high] - area[low]
        draws_low, draws_high = resampled.get((*key, low)), resampled.get((*key, high))
        for index, method in zip(rows.index, rows["method"]):
            table.loc[index, "nac_auc"] = (area[method] - area[low]) / span
            draws = resampled.get((*key, method))
            if draws is None or draws_low is None or draws_high is None:
                continue
            spans = draws_high - draws_low
            ratio = np.where(spans > 0, (draws - draws_low) / np.where(spans > 0, spans, 1.0), np.nan)
            tail = (1.0 - LEVEL) / 2.0 * 100.0
            lo, hi = np.nanpercentile(ratio, [tail, 100.0 - tail])
            table.loc[index, ["nac_auc_lo", "nac_auc_hi"]] = [float(lo), float(hi)]
    return table


def area_table(points: pd.DataFrame, roles: dict[str, str] | None = None) -> pd.DataFrame:
    """Equal-coverage AUC per (group, method): mean over seeds of the trapezoid of accuracy
    over the group's common grid of targets, its 95% interval (seeds x test samples), its
    difference from the best learned method (``vs_best``), the normalised area ``nac_auc``
    with its interval, the number of targets the method has, rank among learned methods and
    ``tied_with_best``. A method without every target of the grid, or a grid of a single
    target, gets no area (NaN), no rank.

    The bootstrap draws the test samples once per group and the seeds once per set of
    seeds, so the areas of methods with the same seeds are resampled together, which is
    what the normalised area's interval needs."""
    if points.empty:
        return pd.DataFrame(columns=AREA_COLUMNS)
    roles = _roles(points["method"].unique(), roles)
    rows, per_seed, contributions = [], [], []
    resampled: dict[tuple, np.ndarray] = {}
    for group_key, group_part in points.groupby(GROUP, sort=True):
        grid = np.sort(group_part["target"].unique())
        weights = trapezoid_weights(grid)
        sizes = {len(flags) for flags in group_part["correct"] if flags is not None}
        samples_draw = (sample_weights(sizes.pop(), group_rng("area samples", *group_key))
                        if len(sizes) == 1 else None)
        for method, part in group_part.groupby("method", sort=True):
            seeds, complete = _used_seeds(part, grid)
            have = part["target"].nunique()
            if not complete or len(grid) < 2:
                rows.append([*group_key, method, np.nan, np.nan, np.nan, have, len(grid),
                             _grid_text(grid), 0])
                continue
            by_point = part.set_index(["seed", "target"])
            values, samples = [], []
            for seed in seeds:
                at = [(seed, c) for c in grid]
                values.append(float(weights @ by_point.loc[at, "accuracy"].to_numpy(float)))
                per_seed.append([*group_key, method, seed, values[-1]])
                outcomes = by_point.loc[at, "correct"].to_list()
                if all(o is not None for o in outcomes) and len({len(o) for o in outcomes}) == 1:
                    samples.append(weights @ np.stack(outcomes).astype(float))
                    contributions.append([*group_key, method, seed, samples[-1]])
            if samples_draw is not None and len(samples) == len(seeds):
                draws = seed_draw(len(seeds), group_rng("area seeds", *group_key,
                                                        tuple(int(s) for s in seeds)))
                resampled[(*group_key, method)] = accuracy_resamples(
                    np.stack(samples), draws, samples_draw)
                lo, hi = percentile_interval(resampled[(*group_key, method)], "accuracy")
            else:  # without per-sample outcomes: a bootstrap over seeds
                lo, hi = seed_interval(np.asarray(values), "accuracy", "area", *group_key, method)
            rows.append([*group_key, method, float(np.mean(values)), lo, hi, have, len(grid),
                         _grid_text(grid), len(seeds)])
    table = pd.DataFrame(rows, columns=[*GROUP, "method", "auc", "auc_lo", "auc_hi", "targets",
                                        "grid_targets", "grid", "n"])
    table["role"] = table["method"].map(roles)
    per_seed_frame = pd.DataFrame(per_seed, columns=[*GROUP, "method", "seed", "value"])
    contribution_frame = pd.DataFrame(contributions, columns=[*GROUP, "method", "seed", "correct"])
    paired = contribution_frame if len(contribution_frame) == len(per_seed_frame) else None
    table = _rank_and_ties(table, "auc", GROUP, per_seed_frame, paired)
    best = table["auc"].where(table["rank"] == 1)
    table["vs_best"] = table["auc"] - best.groupby([table[k] for k in GROUP]).transform("max")
    table = _normalised(table, resampled, roles)
    return _ordered(table, GROUP, AREA_COLUMNS)


def _marked(value: float, rank, tied, decimals: int = 3) -> str:
    """``*0.912`` best, ``=0.905`` tied with the best, `` 0.801`` otherwise."""
    if pd.isna(value):
        return "–"
    mark = ("*" if not pd.isna(rank) and rank == 1
            else "=" if not pd.isna(tied) and bool(tied) else " ")
    return f"{mark}{value:.{decimals}f}"


def _interval(lo, hi) -> str:
    return "" if pd.isna(lo) or pd.isna(hi) else f" [{lo:.3f}, {hi:.3f}]"


def coverage_blocks(area: pd.DataFrame, targets: pd.DataFrame):
    """Per group: (dataset, missing_rate, workload, table of display strings) with one row per
    method (learned by area rank, then references): rank, method, the equal-coverage AUC with
    its interval, its difference from the best (``vs best``), the normalised area with its
    interval, then the accuracy at every target (``*`` best, ``=`` tied with the best)."""
    for key, rows in area.groupby(GROUP, sort=False):
        at = targets[_in_group(targets, key)]
        grid = sorted(at["target"].unique())
        lookup = {(r.method, r.target): r for r in at.itertuples(index=False)}
        shown = []
        for row in rows.itertuples(index=False):
            reference = row.role != "method"
            if pd.isna(row.auc):
                area_text = ("– (one target: no area)" if row.grid_targets < 2 else
                             f"incomplete ({row.targets} of {row.grid_targets} targets)")
            else:
                mark = (f"{row.auc:.3f}" if reference
                        else _marked(row.auc, row.rank, row.tied_with_best).strip())
                area_text = mark + _interval(row.auc_lo, row.auc_hi)
            normalised = ("–" if pd.isna(row.nac_auc)
                          else f"{row.nac_auc:.3f}{_interval(row.nac_auc_lo, row.nac_auc_hi)}")
            cells = []
            for c in grid:
                point = lookup.get((row.method, c))
                cells.append("–" if point is None else
                             _marked(point.accuracy, point.rank, point.tied_with_best).strip()
                             if not reference else f"{point.accuracy:.3f}")
            shown.append(["ref" if reference else "–" if pd.isna(row.rank) else str(int(row.rank)),
                          row.method, area_text,
                          "–" if pd.isna(row.vs_best) else f"{row.vs_best:+.3f}", normalised,
                          *cells, str(row.n)])
        columns = ["rank", "method", AREA_NAME, "vs best", NORMALISED_NAME,
                   *(f"c={c:g}" for c in grid), "n"]
        yield (*key, pd.DataFrame(shown, columns=columns))
