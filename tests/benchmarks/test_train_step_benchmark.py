"""pytest-benchmark timings of one train step at 16x16 and 32x32 (small_cnn, batch 128),
with XLA's native convolution (the default) and the matmul formulation (``L2D_CONV=matmul``).

Target (issue: CPU training at CIFAR size): with the convolution the harness uses, 32x32
throughput is at least 1/5.5 of 16x16 throughput (4x the pixels; proportional is 1/4).
"""

from __future__ import annotations

import jax
import pytest

try:  # repository root on sys.path (PYTHONPATH=.)
    from tests.benchmarks.train_step_table import BATCH, step_seconds
except ImportError:  # pragma: no cover
    from train_step_table import BATCH, step_seconds

TARGET_RATIO = 1 / 5.5


@pytest.mark.benchmark(min_rounds=3, warmup=False)
@pytest.mark.parametrize("conv", ["native", "matmul"])
@pytest.mark.parametrize("size", [16, 32])
def test_train_step(benchmark, size, conv):
    if benchmark.disabled:
        pytest.skip("timings only when benchmarks are enabled")
    seconds = benchmark.pedantic(lambda: step_seconds("classifier_only", "small_cnn", size, conv,
                                                      repeats=1), rounds=3)
    benchmark.group = "train step small_cnn classifier_only"
    benchmark.extra_info.update({"size": size, "conv": conv, "images_per_second": BATCH / seconds,
                                 "backend": jax.default_backend()})


def test_cifar_size_throughput_ratio(benchmark):
    """32x32 vs 16x16 throughput with the convolution the harness picks on this backend."""
    if benchmark.disabled:
        pytest.skip("timing ratios only when benchmarks are enabled")
    from methods.nets import conv_implementation

    conv = conv_implementation()
    small = step_seconds("classifier_only", "small_cnn", 16, conv)
    large = step_seconds("classifier_only", "small_cnn", 32, conv)
    native_large = step_seconds("classifier_only", "small_cnn", 32, "native")
    benchmark.extra_info.update({"conv": conv, "ratio": small / large,
                                 "speedup_32_over_native": native_large / large})
    benchmark(lambda: None)
    assert small / large >= TARGET_RATIO, (small, large)
