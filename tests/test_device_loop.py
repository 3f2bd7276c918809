"""The on-device training loop: batches built on the device equal the host's where the
random draws can be equal, augmentations have the right statistics where they cannot,
training matches the host loop, and an epoch is a fixed number of dispatches with no
implicit host transfer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmark import predictions, training
from benchmark.config import ConfigError, TrainConfig, build_method
from core.spec import TaskSpec, WorkloadBounds
from datasets.device import device_batch, epoch_rows, put_split
from datasets.source import ArraySplit, Augment, ImageFormat, LoaderConfig, StreamedSplit, epoch_batches

SPEC = TaskSpec(num_classes=10, num_experts=3, input_shape=(8, 8, 1), backbone="small_cnn")
BOUNDS = WorkloadBounds((0.0,) * 4, (1.0, 1.0, 1.0, 0.4))  # the classifier's cap is active
PLAIN = LoaderConfig(batch_size=16, mean=(0.5,), std=(0.25,), drop_remainder=True)


def make_split(n=80, size=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    t = np.where(rng.random((n, 3)) < 0.5, y[:, None], -1).astype(np.int32)
    return ArraySplit(rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), y, t)


def test_device_batches_equal_host_batches_without_random_draws():
    split = make_split(n=70)
    for epoch in (0, 1):
        rows = epoch_rows(len(split), PLAIN.batch_size, 3, epoch)
        host = list(epoch_batches(split, PLAIN, seed=3, epoch=epoch))
        assert rows.shape == (len(host), PLAIN.batch_size) == (4, 16)  # the last 6 dropped
        on_device = put_split(split)
        for step_rows, want in zip(rows, host):
            got = device_batch(on_device, jnp.asarray(step_rows), jax.random.key(0), PLAIN)
            np.testing.assert_allclose(got.x, want.x, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(got.y, want.y)
            np.testing.assert_array_equal(got.t, want.t)


def position_images(n, size=8):
    """Each pixel holds 1 + 10 * row + column: a pixel's value says where it came from."""
    grid = 1 + 10 * np.arange(size)[:, None] + np.arange(size)[None, :]
    return np.broadcast_to(grid[None, :, :, None], (n, size, size, 1)).astype(np.uint8)


def raw_pixels(batch, config):
    return np.rint((np.asarray(batch.x) * np.asarray(config.std) + np.asarray(config.mean)) * 255)


def draw(config, images, key=0):
    split = put_split(ArraySplit(images, np.zeros(len(images), np.int32), np.zeros((len(images), 3), np.int32)))
    return device_batch(split, jnp.arange(len(images)), jax.random.key(key), config)


def test_random_crop_offsets_are_uniform():
    n, config = 4500, dataclasses.replace(PLAIN, crop=6)
    pixels = raw_pixels(draw(config, position_images(n)), config)
    assert pixels.shape == (n, 6, 6, 1)
    top_left = pixels[:, 0, 0, 0].astype(int) - 1
    dy, dx = top_left // 10, top_left % 10
    counts = np.bincount(3 * dy + dx, minlength=9)
    assert counts.sum() == n and len(counts) == 9  # offsets 0..2 only
    assert np.all(np.abs(counts - n / 9) < 4 * np.sqrt(n / 9)), counts
    # each crop is a contiguous window of its image
    np.testing.assert_array_equal(pixels[:, :, :, 0] - pixels[:, :1, :1, 0],
                                  np.broadcast_to(10 * np.arange(6)[:, None] + np.arange(6), (n, 6, 6)))


def test_padding_crop_and_flip_statistics():
    n = 4000
    config = dataclasses.replace(PLAIN, augment=Augment(crop_padding=1, hflip=True))
    pixels = raw_pixels(draw(config, position_images(n)), config)[..., 0].astype(int)
    centre = pixels[:, 4, 4] - 1  # image[4 + dy - 1, 4 + dx - 1], columns mirrored when flipped
    right = pixels[:, 4, 5] - 1
    flipped = right < centre
    assert abs(flipped.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
    row = centre // 10 - 3  # dy in 0..2
    assert set(np.unique(row)) == {0, 1, 2}
    assert np.all(np.abs(np.bincount(row) - n / 3) < 4 * np.sqrt(n / 3))
    zero_rows = np.all(pixels[:, 0, :] == 0, axis=1)  # padding shows when dy = 0
    np.testing.assert_array_equal(zero_rows, row == 0)


def test_pixel_noise_statistics_and_determinism():
    n = 512
    config = dataclasses.replace(PLAIN, augment=Augment(noise_std=0.05))
    images = np.full((n, 8, 8, 1), 128, np.uint8)
    batch = draw(config, images)
    noise = np.asarray(batch.x) * 0.25 + 0.5 - 128 / 255
    assert abs(noise.mean()) < 4 * 0.05 / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(0.05, rel=0.02)
    np.testing.assert_array_equal(draw(config, images).x, batch.x)  # same key, same draw
    assert not np.allclose(draw(config, images, key=1).x, batch.x)


def host_batches(split, loader, seed):
    return lambda epoch: epoch_batches(split, loader, seed=seed, epoch=epoch)


def train(name, data, seeds, epochs=3, total_steps=None):
    """``epochs`` of 5 steps; the schedule spans ``total_steps`` (default: those epochs)."""
    method = build_method(name, {}, SPEC)
    models = [training.init_model(method, SPEC, seed) for seed in seeds]
    optim = training.OptimConfig(learning_rate=0.05, total_steps=total_steps or epochs * 5)
    return training.fit(method, models, data, epochs=epochs, optim=optim, bounds=BOUNDS)


@pytest.mark.parametrize("name,seeds", [
    ("classifier_only", (0,)), ("prob_l2d", (0, 1)),
    # the other two pairs: the seeds' path (vmap over a seed axis or not) does not depend on
    # the method, and each method's loss runs in the cases above
    pytest.param("classifier_only", (0, 1), marks=pytest.mark.slow),
    pytest.param("prob_l2d", (0,), marks=pytest.mark.slow),
])
def test_device_loop_trains_as_the_host_loop(name, seeds):
    splits = tuple(make_split(seed=seed) for seed in seeds)  # each seed its own labels
    host = train(name, [host_batches(split, PLAIN, seed) for split, seed in zip(splits, seeds)], seeds)
    for per_dispatch in (None, 5):  # the backend's choice; a whole epoch (5 steps) per dispatch
        device = train(name, training.DeviceEpochs(splits, PLAIN, seeds, per_dispatch), seeds)
        x = np.asarray(draw(PLAIN, splits[0].images).x)
        for ours, theirs in zip(device, host):
            assert ours.samples_seen == theirs.samples_seen == 3 * 80
            assert [h["loss"] for h in ours.history] == pytest.approx(
                [h["loss"] for h in theirs.history], rel=1e-4)
            np.testing.assert_allclose(ours.predict(x)["scores"], theirs.predict(x)["scores"],
                                       rtol=1e-3, atol=1e-4)


REAL_CHUNK = training.train_chunk


class StepNotCalled:
    """Stands in for ``training.train_step``: traced inside the epoch program, never called."""

    __wrapped__ = staticmethod(training.train_step.__wrapped__)

    def __call__(self, *args):
        raise AssertionError("a per-batch train_step dispatch in the on-device loop")


class CountingProgram:
    """Stands in for ``training.train_chunk``: counts calls of the compiled programs."""

    def __init__(self, calls):
        self.calls = calls

    def lower(self, *args, **kwargs):
        lowered = REAL_CHUNK.lower(*args, **kwargs)
        calls = self.calls
        return SimpleNamespace(compile=lambda: self._counted(lowered.compile(), calls))

    @staticmethod
    def _counted(compiled, calls):
        def run(*args):
            calls.append(1)
            return compiled(*args)
        return run


@pytest.mark.parametrize("per_dispatch,dispatches", [(5, 1), (2, 3), (1, 5)])
def test_an_epoch_is_a_fixed_number_of_dispatches_with_explicit_copies_only(
        monkeypatch, per_dispatch, dispatches):
    split = make_split()  # 80 samples, batch 16: 5 steps an epoch
    augmented = dataclasses.replace(PLAIN, augment=Augment(crop_padding=1, hflip=True, noise_std=0.1))
    counts = {}
    real_put, real_get = jax.device_put, jax.device_get
    for epochs in (1, 3):
        calls, puts, gets = [], [], []
        monkeypatch.setattr(training, "train_chunk", CountingProgram(calls))
        monkeypatch.setattr(jax, "device_put", lambda *a, **k: puts.append(1) or real_put(*a, **k))
        monkeypatch.setattr(jax, "device_get", lambda *a, **k: gets.append(1) or real_get(*a, **k))
        monkeypatch.setattr(training, "train_step", StepNotCalled())
        # the epochs themselves run under jax.transfer_guard("disallow"): an implicit copy fails;
        # one schedule for both runs, so the second reuses the first's compiled programs
        (trained,) = train("prob_l2d", training.DeviceEpochs((split,), augmented, (0,), per_dispatch),
                           (0,), epochs=epochs, total_steps=15)
        monkeypatch.undo()
        assert len(trained.history) == epochs
        counts[epochs] = (len(calls), len(puts), len(gets))
    (calls_1, puts_1, gets_1), (calls_3, puts_3, gets_3) = counts[1], counts[3]
    assert calls_1 == dispatches and calls_3 == 3 * dispatches
    assert puts_3 - puts_1 == 2  # each further epoch: its rows, (steps, B) int32, one copy
    assert gets_3 - gets_1 == 2  # each epoch: its metrics, one fetch


def test_device_loop_needs_in_memory_data():
    streamed = StreamedSplit(Path("."), ("a.png",), ImageFormat(8, 8, 1), np.zeros(1), np.zeros((1, 3)))
    cells = [(SimpleNamespace(seed=0), SimpleNamespace(train=streamed))]
    run = SimpleNamespace(train=TrainConfig(loop="device"))
    with pytest.raises(ValueError, match="train.loop=device needs the training images in memory"):
        predictions._training_data(run, cells, PLAIN)
    run = SimpleNamespace(train=TrainConfig(loop="auto"))
    assert isinstance(predictions._training_data(run, cells, PLAIN), list)  # streamed: host batches
    in_memory = [(SimpleNamespace(seed=4), SimpleNamespace(train=make_split()))]
    data = predictions._training_data(run, in_memory, PLAIN)
    assert isinstance(data, training.DeviceEpochs) and data.seeds == (4,)
    run = SimpleNamespace(train=TrainConfig(loop="host"))
    assert isinstance(predictions._training_data(run, in_memory, PLAIN), list)


@pytest.mark.parametrize("option,value", [("loop", "gpu"), ("precision", "fp16")])
def test_train_options_are_checked(option, value):
    with pytest.raises(ConfigError, match=f"train.{option} must be one of"):
        TrainConfig(**{option: value})


def test_streamed_batches_cross_one_step_ahead():
    log = []

    def put(batch):
        log.append(("copy", batch))
        return batch

    for batch in training.prefetch(iter(range(4)), put):
        log.append(("step", batch))
    assert log == [("copy", 0), ("copy", 1), ("step", 0), ("copy", 2), ("step", 1),
                   ("copy", 3), ("step", 2), ("step", 3)]
