"""pytest-benchmark timings of the constrained E-step against the reference yardstick.

For every (B, E, K) shape: the yardstick (O(B E^2 K) mean-field + FISTA), exact E-step +
``constrain_posterior`` and mean-field E-step + ``constrain_posterior``, each one jitted
program compiled once outside the timing, ``block_until_ready`` inside the timed call.
Benchmarks are grouped by shape; ``extra_info`` records the constraint violation, the shape
and the JAX backend. Ours must reach violation <= 1e-4. With ``--benchmark-disable`` each
function runs once (a quick correctness pass); ``--benchmark-only`` times them.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from methods.estep import reference_estep

try:  # repository root on sys.path (PYTHONPATH=.)
    from tests.benchmarks.estep_table import PIPELINES, SHAPES, pipeline_inputs, time_pipelines
    from tests.benchmarks.reference_estep import _yardstick_meanfield
except ImportError:  # pragma: no cover - only this folder on sys.path
    from estep_table import PIPELINES, SHAPES, pipeline_inputs, time_pipelines
    from reference_estep import _yardstick_meanfield

TARGET_VIOLATION = 1e-4


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
    if pipeline != "yardstick":
        assert violation <= TARGET_VIOLATION


def test_speedup_over_yardstick(benchmark):
    """Ratio check in one process (lenient threshold; the table reports the real ratios)."""
    if benchmark.disabled:
        pytest.skip("timing ratios only when benchmarks are enabled")
    results = time_pipelines(cached_inputs((1024, 8, 100)), repeats=15)
    benchmark.extra_info.update({name: res["ms"] for name, res in results.items()})
    benchmark(lambda: None)
    assert results["yardstick"]["ms"] / results["exact"]["ms"] >= 5.0


def test_yardstick_estep_is_the_reference_variant():
    """The yardstick's O(B E^2 K) E-step and methods.estep.reference_estep agree."""
    log_p_z, log_p_t, y, t, _, _ = cached_inputs((128, 8, 3))
    want = _yardstick_meanfield(log_p_z, log_p_t, y, t, 1e-3, 10)
    got = reference_estep(log_p_z, log_p_t, y, t, 1e-3, num_iters=10)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
