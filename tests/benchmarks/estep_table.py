"""Scaling table of the constrained E-step against the reference-approach yardstick.

Run: ``PYTHONPATH=. .venv/bin/python tests/benchmarks/estep_table.py [--repeats N]
[--shapes B,E,K ...]``. For each shape it times, compile excluded (one warm-up call per
function), ``block_until_ready`` before reading the clock, the median over ``--repeats``
calls (made in rounds of consecutive calls, alternating pipelines between rounds) of:

* the yardstick (``reference_estep.yardstick_constrained_estep``: O(B E^2 K) mean-field +
  FISTA on the workload dual);
* ``exact_estep`` + ``constrain_posterior`` (one jitted program);
* ``meanfield_estep`` + ``constrain_posterior`` (one jitted program);

and prints a Markdown table with the speed-ups and the constraint violations. Ratios, not
absolute times, are the claim: they are measured in the same process on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

try:  # repository root on sys.path (PYTHONPATH=.)
    from tests.benchmarks.reference_estep import (benchmark_bounds, make_problem,
                                                  yardstick_constrained_estep)
except ImportError:  # pragma: no cover - only this folder on sys.path
    from reference_estep import benchmark_bounds, make_problem, yardstick_constrained_estep

from methods.projection import constrain_posterior
from methods.estep import exact_estep, meanfield_estep

SHAPES = ((128, 2, 100), (128, 8, 3), (1024, 8, 100), (4096, 8, 10))


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
    "yardstick": yardstick_constrained_estep,
    "exact": exact_constrained,
    "meanfield": meanfield_constrained,
}


def pipeline_inputs(batch: int, num_experts: int, num_classes: int, seed: int = 0):
    """Device arrays ``(log_p_z, log_p_t, y, t, lo, hi)`` for one benchmark shape."""
    lo, hi = benchmark_bounds(num_experts)
    return (*make_problem(batch, num_experts, num_classes, seed), jnp.asarray(lo), jnp.asarray(hi))


def time_pipelines(inputs, repeats: int = 50, rounds: int = 5, stat: str = "median") -> dict[str, dict]:
    """Wall time (ms, compile excluded; ``stat`` "median" or "min" over the calls) and
    violation of each pipeline on ``inputs``.

    The calls are made in ``rounds`` rounds; in each round every pipeline runs
    ``repeats // rounds`` consecutive calls (warm caches, as in pytest-benchmark), so slow
    drifts of the machine load hit every pipeline alike.
    """
    results = {}
    for name, fn in PIPELINES.items():
        out = jax.block_until_ready(fn(*inputs))  # compile + warm-up
        results[name] = {"violation": float(out[2]["violation"]), "times": []}
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, fn in PIPELINES.items():
            jax.block_until_ready(fn(*inputs))  # re-warm caches after the other pipelines
            for _ in range(per_round):
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                results[name]["times"].append(time.perf_counter() - start)
    summary = {"median": statistics.median, "min": min}[stat]
    for entry in results.values():
        entry["ms"] = 1e3 * summary(entry.pop("times"))
    return results


def markdown_table(rows) -> str:
    """Markdown table from ``[(shape, results), ...]``."""
    lines = [
        "| B | E | K | yardstick ms | exact ms | meanfield ms | speed-up exact | "
        "speed-up meanfield | violation yardstick | violation exact | violation meanfield |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (batch, experts, classes), res in rows:
        yard, exact, mean = res["yardstick"], res["exact"], res["meanfield"]
        lines.append(
            f"| {batch} | {experts} | {classes} | {yard['ms']:.3f} | {exact['ms']:.3f} | "
            f"{mean['ms']:.3f} | {yard['ms'] / exact['ms']:.1f}x | {yard['ms'] / mean['ms']:.1f}x | "
            f"{yard['violation']:.1e} | {exact['violation']:.1e} | {mean['violation']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--shapes", nargs="*", default=None, help="shapes as B,E,K")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="summary of the repeated calls (min is robust to a loaded machine)")
    args = parser.parse_args(argv)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    rows = [(shape, time_pipelines(pipeline_inputs(*shape), args.repeats, stat=args.stat))
            for shape in shapes]
    device = jax.devices()[0]
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind} "
          f"({device.platform}), float32, {args.stat} of {args.repeats} calls, compile excluded\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
