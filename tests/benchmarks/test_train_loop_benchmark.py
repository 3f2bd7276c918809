"""pytest-benchmark: the on-device training loop against the host-batch loop, same process.

Each case trains ``prob_l2d`` (small_cnn, batch 128) for ``EPOCHS`` epochs on in-memory
data of a cell's size with ``training.fit``: once with ``DeviceEpochs`` (the split on the
device, batches and augmentation built there; ``train.loop=auto``'s choice for in-memory
data) and once with the host batches of ``source.epoch_batches`` (``train.loop=host``).
Compilation is excluded: each loop trains once before the timing (the jitted programs
stay cached in the process). Target: the device loop is no slower than the host loop
(within ``TOLERANCE`` for timer noise).

    PYTHONPATH=. .venv/bin/python -m pytest tests/benchmarks/test_train_loop_benchmark.py --benchmark-enable
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
import pytest

from benchmark import training
from benchmark.config import build_method
from core.spec import TaskSpec, WorkloadBounds
from datasets.source import ArraySplit, Augment, LoaderConfig, epoch_batches

EPOCHS, BATCH, REPEATS = 2, 128, 3
TOLERANCE = 1.10
# name: (samples, side, channels, augmentation): the digits training split and CIFAR-10H
# at a quarter of its 8,000 training images
CASES = {
    "digits-8x8": (1257, 8, 1, Augment(noise_std=0.4)),
    "cifar-32x32": (2048, 32, 3, Augment(crop_padding=4, hflip=True)),
}
BOUNDS = WorkloadBounds((0.0,) * 4, (1.0, 1.0, 1.0, 0.5))


def prepared_fit(case: str, loop: str, steps_per_dispatch: int | None = None):
    """A warmed-up ``fit`` of ``case`` with the ``loop`` ("device" or "host"; the device
    loop with ``steps_per_dispatch``, None: the backend's default); returns ``run()``, which
    trains a fresh model and returns it."""
    samples, side, channels, augment = CASES[case]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, samples).astype(np.int32)
    t = np.where(rng.random((samples, 3)) < 0.5, y[:, None], -1).astype(np.int32)
    split = ArraySplit(rng.integers(0, 256, (samples, side, side, channels), dtype=np.uint8), y, t)
    loader = LoaderConfig(BATCH, (0.5,) * channels, (0.25,) * channels, augment, drop_remainder=True)
    spec = TaskSpec(10, 3, (side, side, channels), "small_cnn")
    method = build_method("prob_l2d", {}, spec)
    optim = training.OptimConfig(total_steps=EPOCHS * (samples // BATCH))
    if loop == "device":
        data = training.DeviceEpochs((split,), loader, (0,), steps_per_dispatch)
    else:
        data = [lambda epoch: epoch_batches(split, loader, seed=0, epoch=epoch)]

    def run():
        model = training.init_model(method, spec, 0)
        (trained,) = training.fit(method, [model], data, epochs=EPOCHS, optim=optim, bounds=BOUNDS)
        return trained

    run()  # compiles
    return run


def loop_seconds(case: str, loop: str, repeats: int = REPEATS,
                 steps_per_dispatch: int | None = None) -> float:
    """Median wall seconds of ``EPOCHS`` epochs (compile excluded)."""
    run = prepared_fit(case, loop, steps_per_dispatch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.benchmark(min_rounds=3, warmup=False)
@pytest.mark.parametrize("loop", ["device", "host"])
@pytest.mark.parametrize("case", list(CASES))
def test_train_loop(benchmark, case, loop):
    if benchmark.disabled:
        pytest.skip("timings only when benchmarks are enabled")
    run = prepared_fit(case, loop)
    trained = benchmark.pedantic(run, rounds=3)
    assert len(trained.history) == EPOCHS and np.isfinite(trained.history[-1]["loss"])
    benchmark.group = f"training loop prob_l2d {case}"
    samples = CASES[case][0] // BATCH * BATCH * EPOCHS
    benchmark.extra_info.update({"loop": loop, "samples_per_second": samples / benchmark.stats.stats.median,
                                 "backend": jax.default_backend()})


@pytest.mark.parametrize("case", list(CASES))
def test_device_loop_is_no_slower_than_host_loop(benchmark, case):
    if benchmark.disabled:
        pytest.skip("timing ratios only when benchmarks are enabled")
    host, device = loop_seconds(case, "host"), loop_seconds(case, "device")
    benchmark.extra_info.update({"host_seconds": host, "device_seconds": device,
                                 "speedup": host / device, "backend": jax.default_backend()})
    benchmark(lambda: None)
    assert device <= TOLERANCE * host, (case, host, device)


def test_default_steps_per_dispatch_is_the_faster_choice(benchmark):
    """The device loop's default (``training.steps_per_dispatch``: one step a dispatch on a
    CPU, a whole epoch elsewhere) is no slower than the other choice on this backend."""
    if benchmark.disabled:
        pytest.skip("timing ratios only when benchmarks are enabled")
    samples = CASES["digits-8x8"][0]
    whole_epoch = samples // BATCH
    default = training.steps_per_dispatch(None, whole_epoch)
    other = 1 if default == whole_epoch else whole_epoch
    chosen = loop_seconds("digits-8x8", "device", steps_per_dispatch=default)
    alternative = loop_seconds("digits-8x8", "device", steps_per_dispatch=other)
    benchmark.extra_info.update({"default_steps": default, "default_seconds": chosen,
                                 "other_steps": other, "other_seconds": alternative,
                                 "speedup": alternative / chosen, "backend": jax.default_backend()})
    benchmark(lambda: None)
    assert chosen <= TOLERANCE * alternative, (default, chosen, other, alternative)
