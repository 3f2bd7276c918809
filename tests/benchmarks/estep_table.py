"""Scaling table of the constrained E-step against the original Prob-L2D E-step.

Run: ``PYTHONPATH=. .venv/bin/python tests/benchmarks/estep_table.py [--repeats N]
[--budget S] [--shapes B,E,K ...] [--stat median|min] [--rounds R] [--pipelines a,b,...]``.
For each shape it times, compile excluded (one warm-up call per function),
``block_until_ready`` before reading the clock, the median (or min) over up to ``--repeats``
calls (made in ``--rounds`` rounds of consecutive calls, the pipelines interleaved round by
round) of jitted programs (``PIPELINES``):

* ``original``: the port of the original code's E-step (``original_estep``: 10 mean-field
  iterations of its variant with the materialised sum over the other agents, then jaxopt's
  ``ProjectedGradient`` defaults, FISTA with backtracking, on the workload dual);
* ``yardstick``: the earlier yardstick (``reference_estep.yardstick_constrained_estep``:
  O(B E^2 K) mean-field, FISTA stopped on a stricter gradient-mapping test);
* ``exact``: ``exact_estep`` + ``constrain_posterior`` with the backend's loop (one program
  compiled as the harness compiles its programs, ``core.compile.jit``), ``exact_fixed`` /
  ``exact_early_exit`` with either loop, and ``exact_plain_jit`` without the shared compile
  options (plain ``jax.jit``);
* ``meanfield``: ``meanfield_estep`` (10 iterations) + ``constrain_posterior``;
* ``fused``: ``methods.fused_estep.fused_exact_constrained``, the one-kernel version (only in
  the default set on a GPU: on a CPU it runs in Pallas's interpret mode, for tests);

and prints a Markdown table with the times, the speed-ups over the original port and over
the yardstick, and every pipeline's constraint violation (max over agents of
``max(0, share - hi, lo - share)``), headed by the backend, device and CPU model. A pipeline whose one call takes
long gets fewer calls: ``max(3, --budget / its warm-up time)``, at most ``--repeats``
(column ``calls``: the fewest any pipeline got on that row), which keeps the largest shapes
of the original port affordable on a CPU. Ratios, not absolute times, are the claim: they
are measured in the same process on the same inputs.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

try:  # repository root on sys.path (PYTHONPATH=.)
    from tests.benchmarks.original_estep import original_constrained_estep
    from tests.benchmarks.reference_estep import benchmark_bounds, make_problem, yardstick_constrained_estep
except ImportError:  # pragma: no cover - only this folder on sys.path
    from original_estep import original_constrained_estep
    from reference_estep import benchmark_bounds, make_problem, yardstick_constrained_estep

from core.compile import jit
from methods.estep import exact_estep, meanfield_estep
from methods.fused_estep import fused_exact_constrained
from methods.projection import constrain_posterior, default_loop

SHAPES = ((128, 2, 100), (128, 8, 3), (1024, 8, 100), (4096, 8, 10), (16384, 8, 10), (65536, 8, 10))


@functools.partial(jit, static_argnames=("loop",))
def exact_constrained(log_p_z, log_p_t, y, t, lo, hi, loop="auto"):
    """Exact E-step followed by the workload projection; returns ``(q_z, q_t, info)``."""
    q_z, q_t = exact_estep(log_p_z, log_p_t, y, t)
    q_z, info = constrain_posterior(q_z, lo, hi, loop=loop)
    return q_z, q_t, info


@jit
def meanfield_constrained(log_p_z, log_p_t, y, t, lo, hi):
    """Mean-field E-step (10 iterations) followed by the workload projection."""
    q_z, q_t = meanfield_estep(log_p_z, log_p_t, y, t)
    q_z, info = constrain_posterior(q_z, lo, hi)
    return q_z, q_t, info


PIPELINES = {
    "original": original_constrained_estep,
    "yardstick": yardstick_constrained_estep,
    "exact": exact_constrained,
    "exact_fixed": functools.partial(exact_constrained, loop="fixed"),
    "exact_early_exit": functools.partial(exact_constrained, loop="early_exit"),
    # the same program compiled without core.compile's options (test_compiler_options_pay)
    "exact_plain_jit": jax.jit(exact_constrained.__wrapped__),  # type: ignore[attr-defined]
    "meanfield": meanfield_constrained,
    "fused": fused_exact_constrained,
}
SPEEDUP_OVER = ("original", "yardstick")  # the yardsticks of the ratio columns


def default_pipelines(backend: str | None = None) -> tuple[str, ...]:
    """The table's pipelines on ``backend``: both loops of the exact pipeline, and the fused
    kernel on a GPU (interpret mode elsewhere is for tests, not timings)."""
    backend = backend or jax.default_backend()
    return ("original", "yardstick", "exact_fixed", "exact_early_exit", "meanfield",
            *(("fused",) if backend == "gpu" else ()))


def cpu_model() -> str:
    """The host CPU: model name, family/model numbers and widest vector extension
    (``/proc/cpuinfo``; ``platform.processor()`` elsewhere) and core count, so a CPU ratio is
    read against the machine that produced it (virtual machines often hide the model name)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    simd = next((label for flag, label in (("amx_tile", "AVX-512, AMX"), ("avx512f", "AVX-512"),
                                           ("avx2", "AVX2"), ("neon", "NEON")) if flag in flags), None)
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    details += [simd] if simd else []
    return f"{name}{' (' + ', '.join(details) + ')' if details else ''}, {os.cpu_count()} cores"


def machine_info() -> dict[str, str]:
    """Backend, accelerator (or CPU) kind, CPU model and the projection loop ``auto`` picks."""
    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": device.device_kind, "cpu": cpu_model(),
            "default_loop": default_loop(), "jax": jax.__version__}


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
    """Markdown table from ``[(shape, results), ...]`` (every row timed the same pipelines):
    times, the speed-up of each of ours over each yardstick present, violations."""
    names = list(rows[0][1])
    ours = [name for name in names if name not in SPEEDUP_OVER]
    over = [base for base in SPEEDUP_OVER if base in names]
    header = (["B", "E", "K", "calls"] + [f"{name} ms" for name in names]
              + [f"{name} vs {base}" for base in over for name in ours]
              + [f"violation {name}" for name in names])
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for (batch, experts, classes), res in rows:
        cells = [str(batch), str(experts), str(classes), str(min(entry["calls"] for entry in res.values()))]
        cells += [f"{res[name]['ms']:.3f}" for name in names]
        cells += [f"{res[base]['ms'] / res[name]['ms']:.1f}x" for base in over for name in ours]
        cells += [f"{res[name]['violation']:.1e}" for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="calls per pipeline, at most")
    parser.add_argument("--budget", type=float, default=0.3,
                        help="seconds of calls per pipeline and shape (fewer calls for slow ones)")
    parser.add_argument("--shapes", nargs="*", default=None, help="shapes as B,E,K")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="summary of the repeated calls (min is robust to a loaded machine)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the calls are interleaved in")
    parser.add_argument("--pipelines", default=None,
                        help=f"comma-separated, of {', '.join(PIPELINES)} "
                             f"(default: {', '.join(default_pipelines())})")
    args = parser.parse_args(argv)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    names = default_pipelines() if args.pipelines is None else tuple(args.pipelines.split(","))
    unknown = sorted(set(names) - set(PIPELINES))
    if unknown:
        parser.error(f"unknown pipelines {', '.join(unknown)}; valid: {', '.join(PIPELINES)}")
    info = machine_info()
    print(f"JAX {info['jax']}, backend {info['backend']}, device {info['device']}, CPU {info['cpu']}; "
          f"float32, {args.stat} of up to {args.repeats} calls in {args.rounds} interleaved rounds "
          f"({args.budget:g} s per pipeline and shape), compile excluded; projection loop of "
          f"'exact'/'meanfield' on this backend: {info['default_loop']}\n", flush=True)
    rows = []
    for shape in shapes:
        rows.append((shape, time_pipelines(pipeline_inputs(*shape), args.repeats, rounds=args.rounds,
                                           stat=args.stat, budget_s=args.budget, names=names)))
        print(f"  timed {shape}", flush=True)
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
