"""Workload bounds: host-side feasibility checks shared by the config, methods and evaluator.

Agents follow ``core.spec``: humans ``0..E-1``, the classifier last. Bounds ``lo, hi``
are per-agent shares of the samples (in ``[0, 1]``). Infeasible bounds are a configuration
error (``InfeasibleBoundsError``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOUND_TOL = 1e-9  # float slack for sums/products of shares written in decimal


class InfeasibleBoundsError(ValueError):
    """Workload bounds that no assignment can satisfy (a configuration error)."""


def named_agents(num_agents: int, agent_names: Sequence[str] | None) -> list[str]:
    """``agent_names`` checked against ``num_agents`` (generic names when None)."""
    if agent_names is None:
        return [f"agent_{k}" for k in range(num_agents)]
    names = list(agent_names)
    if len(names) != num_agents:
        raise InfeasibleBoundsError(
            f"Workload bounds cover {num_agents} agents but {len(names)} agent names were given "
            f"({names}); give one lower and one upper bound per agent, classifier last."
        )
    return names


def check_bounds(lo, hi, agent_names: Sequence[str] | None = None):
    """Validate workload bounds on the host; return them as float64 numpy arrays.

    Requires 1-D ``lo`` and ``hi`` of the same length (one entry per agent), finite,
    ``0 <= lo_k <= hi_k <= 1`` and ``sum(lo) <= 1 <= sum(hi)``. Raises
    ``InfeasibleBoundsError`` naming the offending agent(s) and values otherwise.
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.ndim != 1 or hi.ndim != 1 or lo.shape != hi.shape:
        raise InfeasibleBoundsError(
            f"Workload bounds must be two 1-D sequences of the same length (one entry per agent, "
            f"classifier last); got lo with shape {lo.shape} and hi with shape {hi.shape}."
        )
    names = named_agents(lo.shape[0], agent_names)
    problems = []
    for k, name in enumerate(names):
        if not (np.isfinite(lo[k]) and np.isfinite(hi[k])):
            problems.append(f"{name} has non-finite bounds (lo={lo[k]}, hi={hi[k]})")
        elif lo[k] < 0.0 or hi[k] > 1.0 or lo[k] > hi[k]:
            problems.append(f"{name} has lo={lo[k]:g}, hi={hi[k]:g} (need 0 <= lo <= hi <= 1)")
    if problems:
        raise InfeasibleBoundsError(
            "Infeasible workload bounds: " + "; ".join(problems) + ". Each agent's share of the "
            "samples must lie in [0, 1] with its lower bound not above its upper bound; fix the "
            "workload config."
        )
    total_lo, total_hi = float(lo.sum()), float(hi.sum())
    if total_lo > 1.0 + BOUND_TOL:
        listing = ", ".join(f"{n}={v:g}" for n, v in zip(names, lo) if v > 0)
        raise InfeasibleBoundsError(
            f"Infeasible workload bounds: the lower bounds sum to {total_lo:g} > 1 ({listing}), "
            "so the agents cannot all receive their minimum share; lower some of them."
        )
    if total_hi < 1.0 - BOUND_TOL:
        listing = ", ".join(f"{n}={v:g}" for n, v in zip(names, hi))
        raise InfeasibleBoundsError(
            f"Infeasible workload bounds: the upper bounds sum to {total_hi:g} < 1 ({listing}), "
            "so some samples could not be routed to any agent; raise some of them."
        )
    return lo, hi
