"""Streamed splits: the same batches as in memory, any worker count, chosen by the config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import datasets.source as source
from benchmark.config import ConfigError, dataset_of
from benchmark.data import load_data
from benchmark.runner import run_cell
from datasets.layout import load_split
from datasets.source import (
    ArraySplit,
    Augment,
    ImageFormat,
    LoaderConfig,
    StreamedSplit,
    decode_all,
    epoch_batches,
    stream_split,
)
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_pipeline import compose_cfg

FMT = ImageFormat(8, 8, 1)
PLAIN = LoaderConfig(batch_size=10, mean=(0.5,), std=(0.5,))
AUGMENTED = LoaderConfig(batch_size=16, mean=(0.5,), std=(0.5,), drop_remainder=True, crop=6,
                         augment=Augment(crop_padding=1, hflip=True, noise_std=0.2))


def _split(root):
    return load_split(root, "train_ground_truth.json", [f"train_expert_{j}.json" for j in range(3)], 10)


def _batches(split, config, **kwargs):
    return list(epoch_batches(split, config, seed=3, epoch=kwargs.pop("epoch", 1), **kwargs))


def _same(first, second, pixels=True):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.t, b.t)
        if pixels:
            assert a.x.dtype == b.x.dtype == np.float32
            np.testing.assert_array_equal(a.x, b.x)


@pytest.mark.parametrize("shuffle", [True, False])
def test_streamed_batches_equal_in_memory_ones(tiny_root, shuffle):
    split = _split(tiny_root)
    memory, streamed = decode_all(split, FMT), stream_split(split, FMT)
    # no augmentation or noise (PLAIN): the same rows, order and pixels, last partial batch too
    _same(_batches(memory, PLAIN, shuffle=shuffle), _batches(streamed, PLAIN, shuffle=shuffle))
    # augmented: the same rows in the same order; the random draws differ (per sample)
    in_memory = _batches(memory, AUGMENTED)
    augmented = _batches(streamed, AUGMENTED)
    _same(in_memory, augmented, pixels=False)
    assert augmented[0].x.shape == (16, 6, 6, 1)
    # evaluation: centred crop, no augmentation, the same pixels
    evaluation = dataclasses.replace(AUGMENTED, augment=Augment(), drop_remainder=False)
    _same(_batches(memory, evaluation, shuffle=False), _batches(streamed, evaluation, shuffle=False))


def test_streamed_augmentation_is_seeded_per_epoch(tiny_root):
    streamed = stream_split(_split(tiny_root), FMT)
    _same(_batches(streamed, AUGMENTED), _batches(streamed, AUGMENTED))
    other = _batches(streamed, AUGMENTED, epoch=2)
    assert any((a.y != b.y).any() for a, b in zip(_batches(streamed, AUGMENTED), other))


def test_worker_processes_do_not_change_the_batches(tiny_root):
    streamed = stream_split(_split(tiny_root), FMT)
    in_process = _batches(streamed, AUGMENTED)
    _same(in_process, _batches(streamed, dataclasses.replace(AUGMENTED, workers=2)))
    # leaving an epoch early stops the workers cleanly
    batches = epoch_batches(streamed, dataclasses.replace(AUGMENTED, workers=2), seed=3, epoch=1)
    np.testing.assert_array_equal(next(batches).x, in_process[0].x)
    batches.close()


def _dataset(root, tmp_path, *overrides):
    cfg, _ = compose_cfg(tiny_overrides(root, tmp_path) + list(overrides))
    return dataclasses.replace(dataset_of(cfg, REPO_ROOT), missing_seed=0)


def test_memory_limit_switches_to_streaming_with_the_same_validation(tiny_root, tmp_path):
    kept = load_data(_dataset(tiny_root, tmp_path), 0.0, tmp_path / "cache", (0.25, 0))
    assert isinstance(kept.train, ArraySplit) and not kept.streamed
    # 72 images of 8x8x1 bytes are 0.0044 MiB decoded: above a 0.004 MiB limit
    data = load_data(_dataset(tiny_root, tmp_path, "dataset.memory_limit_mb=0.004"), 0.0,
                     tmp_path / "cache", (0.25, 0))
    assert data.streamed and isinstance(data.test, StreamedSplit)
    assert isinstance(data.validation, StreamedSplit)
    for name in ("train", "validation", "test"):
        a, b = getattr(kept, name), getattr(data, name)
        assert len(a) == len(b)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.t, b.t)
    _same(_batches(kept.validation, PLAIN, shuffle=False), _batches(data.validation, PLAIN, shuffle=False))


def test_cache_false_streams_a_whole_cell(tiny_root, tmp_path, monkeypatch):
    epochs = []
    stream_epoch = source._stream_epoch

    def counted(*args, **kwargs):
        epochs.append(kwargs["shuffle"])
        return stream_epoch(*args, **kwargs)

    monkeypatch.setattr(source, "_stream_epoch", counted)
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["dataset.cache=false"])
    record = run_cell(cfg, choices)
    assert record["status"] == "ok", record.get("error")
    assert epochs.count(True) == 2 and False in epochs  # 2 training epochs, then evaluation
    assert not list((tmp_path / "cache").rglob("images-*.npz"))  # nothing decoded to disk


@pytest.mark.parametrize("option, value, message", [
    ("workers", -1, "dataset.workers must be >= 0, got -1."),
    ("memory_limit_mb", -2.0, "dataset.memory_limit_mb must be >= 0, got -2.0."),
])
def test_bad_streaming_options_name_themselves(tmp_path, option, value, message):
    cfg, _ = compose_cfg(tiny_overrides(tmp_path, tmp_path))
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(cfg.dataset, **{option: value})
    assert str(err.value) == message


@pytest.mark.parametrize("override", ["dataset.workers=1.5", "dataset.memory_limit_mb=lots",
                                      "dataset.cache=sometimes"])
def test_streaming_options_of_the_wrong_type_fail_at_composition(tmp_path, override):
    with pytest.raises(Exception) as err:
        compose_cfg(tiny_overrides(tmp_path, tmp_path) + [override])
    assert override.split("=")[0] in str(err.value)
