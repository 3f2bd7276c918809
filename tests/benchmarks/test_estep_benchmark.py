"""pytest-benchmark timings of the constrained E-step against the original Prob-L2D E-step.

For every (B, E, K) shape of ``estep_table.SHAPES``: the port of the original code's E-step
(``original_estep``: its mean-field variant with the materialised sum over the other agents,
then jaxopt-default FISTA on the workload dual), the earlier yardstick (O(B E^2 K)
mean-field + FISTA), exact E-step + ``constrain_posterior`` and mean-field E-step +
``constrain_posterior``, each one jitted program compiled once outside the timing,
``block_until_ready`` inside the timed call. Benchmarks are grouped by shape;
``extra_info`` records the constraint violation, the shape and the JAX backend. Ours must
reach violation <= 1e-4. With ``--benchmark-disable`` (the default in pyproject.toml) each
function runs once (a quick correctness pass); ``--benchmark-enable --benchmark-only`` times
them:

    PYTHONPATH=. .venv/bin/python -m pytest tests/benchmarks/test_estep_benchmark.py --benchmark-enable --benchmark-only -q

``test_speedup_over_original`` checks, in one process, exact E-step + projection against the
original port at (1024, 8, 100), median of 200 calls of ours (fewer, within 2 s, of the
original). The target is 100x; on the idle 2-core CPU it measured 112x-113x (148x-151x with
the former adaptive while-loop projection: the fixed 12 iterations cost about 0.15 ms of the
0.41 ms), so the assertion is 80x, a margin for load on a shared machine; the table reports
the real ratios.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from methods.estep import reference_estep

try:  # repository root on sys.path (PYTHONPATH=.)
    from tests.benchmarks.estep_table import PIPELINES, SHAPES, pipeline_inputs, time_pipelines
    from tests.benchmarks.original_estep import original_meanfield
    from tests.benchmarks.reference_estep import _yardstick_meanfield
except ImportError:  # pragma: no cover - only this folder on sys.path
    from estep_table import PIPELINES, SHAPES, pipeline_inputs, time_pipelines
    from original_estep import original_meanfield
    from reference_estep import _yardstick_meanfield

TARGET_VIOLATION = 1e-4
SPEEDUP_SHAPE = (1024, 8, 100)
MIN_SPEEDUP = 80.0  # target 100x; measured 112x-113x on the 2-core CPU (module docstring)


@functools.lru_cache(maxsize=None)
def cached_inputs(shape):
    return pipeline_inputs(*shape)


def shape_id(shape):
    return "B{}-E{}-K{}".format(*shape)


@pytest.mark.benchmark(min_rounds=5, warmup=False)
@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_constrained_estep(benchmark, shape, pipeline):
    inputs = cached_inputs(shape)
    fn = PIPELINES[pipeline]
    jax.block_until_ready(fn(*inputs))  # compile once, outside the timing
    benchmark.group = f"constrained E-step {shape_id(shape)}"
    result = benchmark(lambda: jax.block_until_ready(fn(*inputs)))
    violation = float(result[2]["violation"])
    benchmark.extra_info.update({
        "batch": shape[0], "experts": shape[1], "classes": shape[2], "pipeline": pipeline,
        "violation": violation, "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
    })
    if pipeline in ("exact", "meanfield"):
        assert violation <= TARGET_VIOLATION


def test_speedup_over_original(benchmark):
    """Ratio check in one process: exact E-step + projection against the original port."""
    if benchmark.disabled:
        pytest.skip("timing ratios only when benchmarks are enabled")
    results = time_pipelines(cached_inputs(SPEEDUP_SHAPE), repeats=200, budget_s=2.0,
                             names=("original", "exact"))
    ratio = results["original"]["ms"] / results["exact"]["ms"]
    benchmark.extra_info.update({name: res["ms"] for name, res in results.items()})
    benchmark.extra_info["speedup_exact_vs_original"] = ratio
    benchmark(lambda: None)
    assert ratio >= MIN_SPEEDUP, f"exact + projection only {ratio:.1f}x the original port"


def test_original_port_estep_is_the_reference_variant():
    """The original port's materialised E-step and methods.estep.reference_estep agree."""
    log_p_z, log_p_t, y, t, _, _ = cached_inputs((128, 8, 3))
    want = jax.jit(original_meanfield)(log_p_z, log_p_t, y, t)
    got = reference_estep(log_p_z, log_p_t, y, t, 1e-3, num_iters=10)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def test_yardstick_estep_is_the_reference_variant():
    """The yardstick's O(B E^2 K) E-step and methods.estep.reference_estep agree."""
    log_p_z, log_p_t, y, t, _, _ = cached_inputs((128, 8, 3))
    want = _yardstick_meanfield(log_p_z, log_p_t, y, t, 1e-3, 10)
    got = reference_estep(log_p_z, log_p_t, y, t, 1e-3, num_iters=10)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
