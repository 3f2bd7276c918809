"""Metric directions: which way is better for every metric a result record can carry.

Names ending in ``/`` are prefixes (``workload/expert_0`` matches ``workload/``). A
direction is ``"higher"``, ``"lower"`` or ``None`` (no better side: a workload share or the
coverage is a description of the decisions, not a score).
"""

from __future__ import annotations

from benchmark.evaluator import METRICS
from benchmark.registry import did_you_mean

HIGHER = "higher"
LOWER = "lower"

# The evaluator owns the metric names and their directions; reports only read them.
METRIC_DIRECTIONS: dict[str, str | None] = METRICS


def direction(name: str) -> str | None:
    """Direction of metric ``name``: ``"higher"``, ``"lower"`` or ``None``.

    Raises ``KeyError`` (with a "did you mean" hint) for a name that is not registered.
    """
    if name in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[name]
    for key, value in METRIC_DIRECTIONS.items():
        if key.endswith("/") and name.startswith(key) and len(name) > len(key):
            return value
    hint = did_you_mean(name, METRIC_DIRECTIONS)
    raise KeyError(f"unknown metric {name!r}.{hint} Registered: {', '.join(METRIC_DIRECTIONS)}.")


def is_ranked(name: str) -> bool:
    """Whether metric ``name`` has a better side (so methods can be ranked on it)."""
    return direction(name) is not None
