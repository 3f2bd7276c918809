"""Scaling table of the constrained E-step against the original Prob-L2D E-step.

Run: ``PYTHONPATH=. .venv/bin/python tests/benchmarks/estep_table.py [--repeats N]
[--budget S] [--shapes B,E,K ...] [--stat median|min]``. For each shape it times, compile
excluded (one warm-up call per function), ``block_until_ready`` before reading the clock,
the median (or min) over up to ``--repeats`` calls (made in rounds of consecutive calls,
alternating pipelines between rounds) of four jitted programs:

* ``original``: the port of the original code's E-step (``original_estep``: 10 mean-field
  iterations of its variant with the materialised sum over the other agents, then jaxopt's
  ``ProjectedGradient`` defaults, FISTA with backtracking, on the workload dual);
* ``yardstick``: the earlier yardstick (``reference_estep.yardstick_constrained_estep``:
  O(B E^2 K) mean-field, FISTA stopped on a stricter gradient-mapping test);
* ``exact``: ``exact_estep`` + ``constrain_posterior`` (one jitted program);
* ``meanfield``: ``meanfield_estep`` (10 iterations) + ``constrain_posterior``;

and prints a Markdown table with the times, the speed-ups of ``exact`` and ``meanfield``
over the original port and over the yardstick, and every pipeline's constraint violation
(max over agents of ``max(0, share - hi, lo - share)``). A pipeline whose one call takes
long gets fewer calls: ``max(3, --budget / its warm-up time)``, at most ``--repeats``
(column ``calls``: the fewest any pipeline got on that row), which keeps the largest shapes
of the original port affordable on a CPU. Ratios, not absolute times, are the claim: they
are measured in the same process on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

try:  # repository root on sys.path (PYTHONPATH=.)
    from tests.benchmarks.original_estep import original_constrained_estep
    from tests.benchmarks.reference_estep import (benchmark_bounds, make_problem,
                                                  yardstick_constrained_estep)
except ImportError:  # pragma: no cover - only this folder on sys.path
    from original_estep import original_constrained_estep
    from reference_estep import benchmark_bounds, make_problem, yardstick_constrained_estep

from methods.estep import exact_estep, meanfield_estep
from methods.projection import constrain_posterior

SHAPES = ((128, 2, 100), (128, 8, 3), (1024, 8, 100), (4096, 8, 10), (16384, 8, 10), (65536, 8, 10))


@jax.jit
def exact_constrained(log_p_z, log_p_t, y, t, lo, hi):
    """Exact E-step followed by the workload projection; returns ``(q_z, q_t, info)``."""
    q_z, q_t = exact_estep(log_p_z, log_p_t, y, t)
    q_z, info = constrain_posterior(q_z, lo, hi)
    return q_z, q_t, info


@jax.jit
def meanfield_constrained(log_p_z, log_p_t, y, t, lo, hi):
    """Mean-field E-step (10 iterations) followed by the workload projection."""
    q_z, q_t = meanfield_estep(log_p_z, log_p_t, y, t)
    q_z, info = constrain_posterior(q_z, lo, hi)
    return q_z, q_t, info


PIPELINES = {
    "original": original_constrained_estep,
    "yardstick": yardstick_constrained_estep,
    "exact": exact_constrained,
    "meanfield": meanfield_constrained,
}


def pipeline_inputs(batch: int, num_experts: int, num_classes: int, seed: int = 0):
    """Device arrays ``(log_p_z, log_p_t, y, t, lo, hi)`` for one benchmark shape."""
    lo, hi = benchmark_bounds(num_experts)
    return (*make_problem(batch, num_experts, num_classes, seed), jnp.asarray(lo), jnp.asarray(hi))


def time_pipelines(inputs, repeats: int = 50, rounds: int = 5, stat: str = "median",
                   budget_s: float | None = None, names=None) -> dict[str, dict]:
    """Wall time (ms, compile excluded; ``stat`` "median" or "min" over the calls) and
    violation of each pipeline (``names``: a subset of ``PIPELINES``) on ``inputs``.

    The calls are made in ``rounds`` rounds; in each round every pipeline runs its share of
    the calls consecutively (warm caches, as in pytest-benchmark), so slow drifts of the
    machine load hit every pipeline alike. A pipeline makes ``repeats`` calls, or with
    ``budget_s`` ``max(3, budget_s / warm-up time)`` calls if fewer (``calls`` in the result).
    """
    names = list(PIPELINES) if names is None else list(names)
    results = {}
    for name in names:
        jax.block_until_ready(PIPELINES[name](*inputs))  # compile
        start = time.perf_counter()
        out = jax.block_until_ready(PIPELINES[name](*inputs))  # warm-up, timed for the budget
        calls = repeats
        if budget_s is not None:
            calls = min(repeats, max(3, int(budget_s / max(time.perf_counter() - start, 1e-9))))
        results[name] = {"violation": float(out[2]["violation"]), "times": [], "calls": calls}
    for round_index in range(rounds):
        for name in names:
            fn, entry = PIPELINES[name], results[name]
            count = entry["calls"] // rounds + (round_index < entry["calls"] % rounds)
            if count == 0:
                continue
            jax.block_until_ready(fn(*inputs))  # re-warm caches after the other pipelines
            for _ in range(count):
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                entry["times"].append(time.perf_counter() - start)
    summary = {"median": statistics.median, "min": min}[stat]
    for entry in results.values():
        entry["ms"] = 1e3 * summary(entry.pop("times"))
    return results


def markdown_table(rows) -> str:
    """Markdown table from ``[(shape, results), ...]``."""
    lines = [
        "| B | E | K | calls | original ms | yardstick ms | exact ms | meanfield ms | "
        "exact vs original | meanfield vs original | exact vs yardstick | meanfield vs yardstick | "
        "violation original | violation yardstick | violation exact | violation meanfield |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (batch, experts, classes), res in rows:
        orig, yard, exact, mean = (res[name] for name in ("original", "yardstick", "exact", "meanfield"))
        calls = min(entry["calls"] for entry in res.values())
        lines.append(
            f"| {batch} | {experts} | {classes} | {calls} | {orig['ms']:.3f} | {yard['ms']:.3f} | "
            f"{exact['ms']:.3f} | {mean['ms']:.3f} | {orig['ms'] / exact['ms']:.1f}x | "
            f"{orig['ms'] / mean['ms']:.1f}x | {yard['ms'] / exact['ms']:.1f}x | "
            f"{yard['ms'] / mean['ms']:.1f}x | {orig['violation']:.1e} | {yard['violation']:.1e} | "
            f"{exact['violation']:.1e} | {mean['violation']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="calls per pipeline, at most")
    parser.add_argument("--budget", type=float, default=0.3,
                        help="seconds of calls per pipeline and shape (fewer calls for slow ones)")
    parser.add_argument("--shapes", nargs="*", default=None, help="shapes as B,E,K")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="summary of the repeated calls (min is robust to a loaded machine)")
    args = parser.parse_args(argv)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    rows = [(shape, time_pipelines(pipeline_inputs(*shape), args.repeats, stat=args.stat,
                                   budget_s=args.budget))
            for shape in shapes]
    device = jax.devices()[0]
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind} "
          f"({device.platform}), float32, {args.stat} of up to {args.repeats} calls "
          f"({args.budget:g} s per pipeline and shape), compile excluded\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
