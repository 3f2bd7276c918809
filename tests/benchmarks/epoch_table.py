"""Paper-scale epoch times on synthetic data, and what a full paper reproduction costs.

For each preset (``PRESETS``: the training split of ``experiment=paper_cifar100``,
PreAct-ResNet18 on 32x32 CIFAR-100, and of ``experiment=paper_chaoyang``, ResNet18 on 256x256
images cropped to 224, as many images as Chaoyang's training split), method and precision,
one epoch of ``training.fit`` with the on-device loop (``DeviceEpochs``: the split on the
device, batches and augmentation built there, batch 128), compilation excluded (``fit``
compiles before its first epoch and times the two apart). The
images are random, made on the device (``jax.random``): no data travels to the machine.

The last table multiplies the times out to the preset's grid (every trained method row x
3 missing rates x 3 seeds x the preset's epochs; evaluation and compilation not counted):
GPU-hours if every row cost what ``classifier_only`` costs (the cheapest trained method)
and what ``prob_l2d`` costs (the most expensive of the two timed).

    PYTHONPATH=. python3 tests/benchmarks/epoch_table.py [--presets paper_cifar100,paper_chaoyang]
        [--methods classifier_only,prob_l2d] [--precisions fp32,bf16] [--quick]

``--quick``: tiny stand-ins (256 images of 16x16 / 24x24 cropped to 16, small_cnn), to try
the script on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from benchmark import training
from benchmark.config import build_method
from core.spec import TaskSpec, WorkloadBounds
from datasets.source import ArraySplit, Augment, LoaderConfig

BATCH = 128
MISSING_RATES, SEEDS = 3, 3  # the paper presets' sweep: missing 0.3/0.5/0.7, seeds 0/1/2
REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A paper experiment's training split and network, as its dataset preset configures them."""

    samples: int  # training images (the split after the 10% validation hold-out)
    stored: int  # stored image side
    crop: int | None  # network input side (random crop in training), None: the stored side
    classes: int
    experts: int
    backbone: str
    augment: Augment
    epochs: int  # the experiment's train.epochs


PRESETS = {
    # CIFAR-100: 50,000 training images, 10% held out; conf/dataset/cifar100.yaml
    "paper_cifar100": Preset(45_000, 32, None, 100, 3, "preact_resnet18",
                             Augment(crop_padding=4, hflip=True), 300),
    # Chaoyang: 4,021 training images, 10% held out; conf/dataset/chaoyang.yaml (experts A, B)
    "paper_chaoyang": Preset(3_619, 256, 224, 4, 2, "resnet18", Augment(), 100),
}
QUICK = {
    "paper_cifar100": Preset(256, 16, None, 10, 3, "small_cnn", Augment(crop_padding=2, hflip=True), 300),
    "paper_chaoyang": Preset(256, 24, 16, 4, 2, "small_cnn", Augment(), 100),
}


def synthetic_split(preset: Preset, seed: int = 0) -> ArraySplit:
    """Random uint8 images, labels and annotations (30% missing) made on the device."""
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (preset.samples, preset.stored, preset.stored, 3)
    images = jax.random.randint(keys[0], shape, 0, 256, dtype=jax.numpy.int32).astype(jax.numpy.uint8)
    y = jax.random.randint(keys[1], (preset.samples,), 0, preset.classes)
    t = jax.random.randint(keys[2], (preset.samples, preset.experts), 0, preset.classes)
    t = jax.numpy.where(jax.random.uniform(keys[3], t.shape) < 0.3, -1, t)
    return ArraySplit(np.asarray(images), np.asarray(y, np.int32), np.asarray(t, np.int32))


def epoch_seconds(preset: Preset, method_name: str, precision: str, split: ArraySplit) -> dict:
    """One epoch of ``fit`` (on-device loop): ``{"epoch_s", "compile_s", "steps", "wall_s"}``."""
    side = preset.crop or preset.stored
    spec = TaskSpec(preset.classes, preset.experts, (side, side, 3), preset.backbone)
    method = build_method(method_name, {}, spec)
    loader = LoaderConfig(BATCH, (0.5,) * 3, (0.25,) * 3, preset.augment, drop_remainder=True,
                          crop=preset.crop)
    steps = preset.samples // BATCH
    optim = training.OptimConfig(total_steps=steps)
    bounds = WorkloadBounds((0.0,) * (preset.experts + 1), (1.0,) * preset.experts + (0.2,))
    model = training.init_model(method, spec, 0, precision)
    start = time.perf_counter()
    (trained,) = training.fit(method, [model], training.DeviceEpochs((split,), loader, (0,)), epochs=1,
                              optim=optim, bounds=bounds)
    if not np.isfinite(trained.history[-1]["loss"]):
        raise FloatingPointError(f"{method_name}: non-finite loss")
    return {"epoch_s": trained.train_seconds, "compile_s": trained.compile_seconds, "steps": steps,
            "wall_s": time.perf_counter() - start}


def trained_method_rows() -> int:
    """Method rows of a paper grid that train: the registered methods that train plus the
    variants under conf/method/ (``prob_l2d_posthoc``)."""
    from methods import METHODS, load_all

    load_all()
    return (sum(METHODS.get(name).trains for name in METHODS.names())
            + len(list((REPO / "conf" / "method").glob("*.yaml"))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--methods", default="classifier_only,prob_l2d")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--quick", action="store_true", help="tiny stand-ins, to try on a CPU")
    args = parser.parse_args(argv)
    presets = QUICK if args.quick else PRESETS
    names = args.presets.split(",")
    unknown = sorted(set(names) - set(presets))
    if unknown:
        parser.error(f"--presets: unknown {', '.join(unknown)}; valid: {', '.join(presets)}")
    methods, precisions = args.methods.split(","), args.precisions.split(",")
    device = jax.devices()[0]
    print(f"backend {jax.default_backend()}, device {device.device_kind}, JAX {jax.__version__}; "
          f"one epoch of the on-device loop, batch {BATCH}, compile excluded"
          f"{' (quick stand-ins)' if args.quick else ''}\n", flush=True)
    print("| preset | backbone | input | train images | method | precision | steps | epoch s | ms/step | "
          "images/s | compile s |")
    print("|---|---|---|---:|---|---|---:|---:|---:|---:|---:|", flush=True)
    times = {}
    for name in names:
        preset = presets[name]
        split = synthetic_split(preset)
        side = preset.crop or preset.stored
        for method in methods:
            for precision in precisions:
                res = epoch_seconds(preset, method, precision, split)
                times[name, method, precision] = res["epoch_s"]
                print(f"| {name} | {preset.backbone} | {side}x{side} | {preset.samples:,} | {method} | "
                      f"{precision} | {res['steps']} | {res['epoch_s']:.2f} | "
                      f"{1000 * res['epoch_s'] / res['steps']:.1f} | "
                      f"{res['steps'] * BATCH / res['epoch_s']:,.0f} | {res['compile_s']:.1f} |", flush=True)
        del split
    rows = trained_method_rows()
    print(f"\nFull reproduction: {rows} trained method rows x {MISSING_RATES} missing rates x "
          f"{SEEDS} seeds x the preset's epochs, one GPU, training only\n")
    print("| preset | precision | epochs | runs | GPU-hours (all rows at classifier_only's cost) | "
          "GPU-hours (all rows at prob_l2d's cost) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        preset, runs = presets[name], rows * MISSING_RATES * SEEDS
        for precision in precisions:
            cost = {m: runs * preset.epochs * times[name, m, precision] / 3600
                    for m in methods if (name, m, precision) in times}
            cells = [f"{cost[m]:,.1f}" if m in cost else "-" for m in ("classifier_only", "prob_l2d")]
            print(f"| {name} | {precision} | {preset.epochs} | {runs} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
