"""The data dictionary of the report's CSV files (``columns.md``): one line per column."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.files import atomic_write_text
from core.spec import metric_spec
from reports.frames import is_decision_free

DECISIONS = {
    "constrained": "capacity-constrained decisions (the workload bounds honoured exactly)",
    "argmax": "argmax decisions (each sample to its highest-scored agent)",
}
FIXED = {
    "dataset": "dataset variant: the preset's name, with @<hash> when settings that change the "
               "data differ from the preset (listed in each record's variant)",
    "method": "method variant: the registered name plus every option or train.*/eval.* setting "
              "that differs from its default, e.g. prob_l2d[estep=meanfield]",
    "missing_rate": "share of the experts' training annotations removed",
    "workload": "workload variant: the preset plus changed settings, e.g. none[coverage=0.3]",
    "role": "method (ranked) or reference (oracle, random, classifier-only, best expert: "
            "never ranked)",
    "rank": "rank of a learned method in its (dataset, missing rate, workload) group on the "
            "primary metric (1 = best, ties share a rank); empty for reference rows",
    "tied_with_best": "true: not significantly different from the group's best learned method "
                      "(paired bootstrap over seeds and test samples, 95%); false: worse; empty "
                      "for reference rows and where no paired test is possible",
    "n": "number of seeds averaged",
    "vs_best": "the primary metric minus the best learned method's in the group (in "
               "coverage_auc.csv: the area minus the best learned method's area)",
    "target": "coverage target c: exactly round(c N) of the N test samples go to the classifier",
    "coverage_error": "largest |realised coverage - target| over the seeds (at most 1/(2N))",
    "auc": "equal-coverage AUC: trapezoid of constrained accuracy over the group's common grid "
           "of coverage targets (mean over seeds); empty when a target is missing or the grid "
           "has one target",
    "nac_auc": "nAC-AUC: the equal-coverage AUC normalised between random deferral at equal "
               "coverage (0) and the oracle (1), (auc - auc of random) / (auc of oracle - auc "
               "of random) in the same group; below 0: worse than random; its interval comes "
               "from the same bootstrap draws as the areas; empty without random and oracle "
               "rows in the group",
    "targets": "coverage targets this method has results for",
    "grid_targets": "coverage targets in the group's common grid",
    "grid": "the group's common grid of coverage targets",
}


# how the report reads a metric, where that differs from the record's own definition
READ_AS = {
    "workload_violation": "largest distance of an agent's share outside its bounds, beyond the "
                          "rounding of a target share to whole samples (a target c allows "
                          "exactly round(c N) of the N test samples, so honoured targets give 0)",
}


def column_meaning(name: str) -> str:
    """One sentence saying what column ``name`` of a report CSV holds."""
    for suffix, end in (("_lo", "lower"), ("_hi", "upper")):
        if name.endswith(suffix) and name != suffix:
            base = name[: -len(suffix)]
            if base in ("auc", "nac_auc", "accuracy") or base.endswith("/accuracy"):
                return (f"{end} end of the 95% bootstrap interval of {base} over seeds and test "
                        "samples (records without per-sample outcomes: over seeds); the same "
                        "draws wherever the same number appears in the report")
            return (f"{end} end of the 95% bootstrap interval of {base} (clipped "
                    "to the metric's range; empty with one seed for metrics other than accuracy)")
    if name in FIXED:
        return FIXED[name]
    decision, metric = name.split("/", 1) if name.split("/")[0] in DECISIONS else ("", name)
    try:
        spec = metric_spec(metric)
    except KeyError:
        return "(not described)"
    better = f"; {spec.direction} is better" if spec.direction else ""
    where = f" under {DECISIONS[decision]}" if decision else ""
    meaning = READ_AS.get(metric, spec.meaning)
    same = "; the same under every decision rule" if is_decision_free(metric) else ""
    return f"mean over seeds of {metric}: {meaning}{where}{same}{better}"


def write_columns(tables: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Write ``columns.md``: for each CSV (file name -> its table), every column and its
    meaning."""
    lines = ["# Columns of the report's CSV files", ""]
    for file, table in tables.items():
        lines += [f"## {file}", "", "| column | meaning |", "|---|---|"]
        lines += [f"| `{column}` | {column_meaning(column)} |" for column in table.columns]
        lines.append("")
    path = Path(path)
    atomic_write_text(path, "\n".join(lines))
    return path
