"""Grain data source and loaders: shapes, dtypes, determinism, augmentation, caching."""

from __future__ import annotations

import numpy as np

from core.spec import Batch
from datasets.layout import load_split
from datasets.source import (
    Augment,
    ImageFormat,
    LoaderConfig,
    augment_batch,
    decode_all,
    epoch_batches,
    stream_split,
)

EXPERTS = [f"train_expert_{j}.json" for j in range(3)]
FMT = ImageFormat(8, 8, 1)
LOADER = LoaderConfig(batch_size=16, mean=(0.5,), std=(0.5,))


def _split(root):
    return load_split(root, "train_ground_truth.json", EXPERTS, 10)


def test_source_items(incomplete_root):
    source = stream_split(_split(incomplete_root), FMT)
    item = source[3]
    assert len(source) == 48
    assert item["image"].shape == (8, 8, 1) and item["image"].dtype == np.uint8
    assert item["y"] == 3 and item["t"].tolist() == [3, 4, -1]  # expert 2 skipped row 3


def test_batches_have_contract_shapes_and_dtypes(tiny_root):
    data = decode_all(_split(tiny_root), FMT)
    batches = list(epoch_batches(data, LOADER, seed=0, epoch=0))
    assert len(batches) == 3
    batch = batches[0]
    assert isinstance(batch, Batch)
    assert batch.x.shape == (16, 8, 8, 1) and batch.x.dtype == np.float32
    assert batch.y.shape == (16,) and batch.y.dtype == np.int32
    assert batch.t.shape == (16, 3) and batch.t.dtype == np.int32
    assert -1.0 <= batch.x.min() and batch.x.max() <= 1.0


def test_shuffle_is_seeded_and_changes_per_epoch(tiny_root):
    data = decode_all(_split(tiny_root), FMT)
    order = lambda seed, epoch: np.concatenate([b.y for b in epoch_batches(data, LOADER, seed=seed, epoch=epoch)])
    assert (order(0, 0) == order(0, 0)).all()
    assert (order(0, 0) != order(0, 1)).any()
    assert (order(0, 0) != order(1, 0)).any()
    assert sorted(order(0, 0).tolist()) == sorted(data.y.tolist())


def test_unshuffled_batches_keep_order_and_last_partial_batch(tiny_root):
    data = decode_all(_split(tiny_root), FMT)
    config = LoaderConfig(batch_size=20, mean=(0.5,), std=(0.5,))
    batches = list(epoch_batches(data, config, seed=0, epoch=0, shuffle=False))
    assert [len(b.y) for b in batches] == [20, 20, 8]
    assert np.concatenate([b.y for b in batches]).tolist() == data.y.tolist()


def test_decode_cache_round_trips(tiny_root, tmp_path):
    split = _split(tiny_root)
    first = decode_all(split, FMT, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("images-*.npz"))) == 1
    (tiny_root / "train/0/000.png").unlink()  # the cache no longer needs the file
    second = decode_all(split, FMT, cache_dir=tmp_path)
    assert (first.images == second.images).all()


def test_resize_and_rgb_decoding(tiny_root):
    source = stream_split(_split(tiny_root), ImageFormat(16, 12, 3))
    assert source[0]["image"].shape == (16, 12, 3)


def test_random_crop_and_flip():
    images = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.uint8)
    flipped = augment_batch(images, Augment(hflip=True), np.random.default_rng(0))
    for original, out in zip(images, flipped):
        assert (out == original).all() or (out == original[:, ::-1]).all()
    cropped = augment_batch(images, Augment(crop_padding=1), np.random.default_rng(1))
    assert cropped.shape == images.shape
    # every crop is a shifted window of the zero-padded image
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for b in range(2):
        assert any((padded[b, dy:dy + 4, dx:dx + 4] == cropped[b]).all() for dy in range(3) for dx in range(3))


def test_streaming_loader_matches_in_memory_content(tiny_root):
    split = _split(tiny_root)
    streamed = list(epoch_batches(stream_split(split, FMT), LOADER, seed=0, epoch=0))
    cached = list(epoch_batches(decode_all(split, FMT), LOADER, seed=0, epoch=0))
    assert [b.y.tolist() for b in streamed] == [b.y.tolist() for b in cached]
    for a, b in zip(streamed, cached):  # LOADER does not augment: the same pixels
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.t, b.t)
