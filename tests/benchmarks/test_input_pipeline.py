"""pytest-benchmark: streamed input pipeline images/s next to train-step images/s.

The input side streams image files written into tmp_path (32x32 PNGs with the CIFAR
augmentation; 256x256 JPEGs cropped to 224 at random with flips, as the Chaoyang preset)
through ``epoch_batches`` with the dataset defaults (``workers=0``: Grain threads in this
process); its images/s are those of a whole epoch, the pipeline's start included. The train side is
one jitted ``classifier_only`` train step on random data of the same shape
(``train_step_table.step_seconds``, compile excluded). Target: the input is not the
bottleneck, i.e. it produces images faster than one train step consumes them. The two
are measured apart: in a run they share the CPU cores.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from PIL import Image

from datasets.source import Augment, ImageFormat, LoaderConfig, StreamedSplit, epoch_batches

try:  # repository root on sys.path (PYTHONPATH=.)
    from tests.benchmarks.train_step_table import step_seconds
except ImportError:  # pragma: no cover
    from train_step_table import step_seconds

# backbone, network input size, files (side, format, count), crop, augmentation, batch, steps
CASES = {
    "small_cnn-32": ("small_cnn", 32, (32, "png", 1024), None,
                     Augment(crop_padding=4, hflip=True), 128, 5),
    "resnet18-224": ("resnet18", 224, (256, "jpeg", 128), 224, Augment(hflip=True), 16, 2),
}


def write_images(root, side: int, fmt: str, count: int) -> StreamedSplit:
    """``count`` random RGB images (hard to compress: slow to decode) as a streamed split."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        name = f"{i:05d}.{'jpg' if fmt == 'jpeg' else 'png'}"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name)
        files.append(name)
    labels = rng.integers(0, 10, count).astype(np.int32)
    return StreamedSplit(root, tuple(files), ImageFormat(side, side, 3), labels,
                         np.stack([labels] * 3, axis=1))


def input_images_per_second(split: StreamedSplit, loader: LoaderConfig, epoch: int) -> float:
    """Images per second of one training epoch (decoded, augmented, batched)."""
    start = time.perf_counter()
    count = sum(len(batch.y) for batch in epoch_batches(split, loader, seed=0, epoch=epoch))
    return count / (time.perf_counter() - start)


@pytest.mark.benchmark(min_rounds=3, warmup=False)
@pytest.mark.parametrize("case", list(CASES))
def test_input_outpaces_train_step(benchmark, tmp_path, case):
    if benchmark.disabled:
        pytest.skip("timings only when benchmarks are enabled")
    from methods.nets import conv_implementation

    backbone, size, (side, fmt, count), crop, augment, batch, steps = CASES[case]
    split = write_images(tmp_path, side, fmt, count)
    loader = LoaderConfig(batch_size=batch, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                          augment=augment, drop_remainder=True, crop=crop)
    rates = []
    benchmark.group = "input pipeline vs train step"
    benchmark.pedantic(lambda: rates.append(input_images_per_second(split, loader, len(rates))),
                       rounds=3)
    input_rate = float(np.median(rates))
    train_rate = batch / step_seconds("classifier_only", backbone, size, conv_implementation(),
                                      batch=batch, steps=steps, repeats=1 if size > 32 else 3)
    benchmark.extra_info.update({
        "backbone": backbone, "size": size, "files": f"{count} {fmt} {side}x{side}", "batch": batch,
        "input_images_per_second": input_rate, "train_step_images_per_second": train_rate,
        "input_over_train": input_rate / train_rate, "backend": jax.default_backend(),
    })
    print(f"\n{case}: input {input_rate:,.0f} images/s, train step {train_rate:,.1f} images/s, "
          f"ratio {input_rate / train_rate:.1f}")
    assert input_rate > train_rate, (input_rate, train_rate)
