"""Metric directions, read from the contract's metric table (``core.spec.METRICS``).

Names ending in ``/`` are prefixes (``workload/expert_0`` matches ``workload/``). A
direction is ``"higher"``, ``"lower"`` or ``None`` (no better side: a workload share or the
coverage is a description of the decisions, not a score).
"""

from __future__ import annotations

from core.spec import LOWER, METRICS, metric_spec  # noqa: F401 (LOWER re-exported)

METRIC_DIRECTIONS: dict[str, str | None] = {name: spec.direction for name, spec in METRICS.items()}


def direction(name: str) -> str | None:
    """Direction of metric ``name``: ``"higher"``, ``"lower"`` or ``None``.

    Raises ``KeyError`` (with a "did you mean" hint) for a name that is not registered.
    """
    return metric_spec(name).direction
