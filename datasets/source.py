"""The only module that opens image files: a Grain data source and the batch loaders.

``ManifestSource`` is a Grain ``RandomAccessDataSource`` over a joined split: item ``i``
is the decoded image with its ground truth and expert labels. Small datasets are decoded
once into memory (``decode_all``, cached on disk as ``.npz`` keyed by the manifests) and
batched by gathering rows; large ones stream through Grain with per-sample decoding.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmark.spec import Batch
from datasets.layout import SplitData
from datasets.manifest import ManifestError, atomic_write_bytes


@dataclass(frozen=True)
class ImageFormat:
    """How images are decoded: target (H, W) and channels (1 = grayscale, 3 = RGB)."""

    height: int
    width: int
    channels: int


@dataclass(frozen=True)
class Augment:
    """Training augmentations, applied per batch: random crop with padding, h-flip and
    additive Gaussian pixel noise (std in units of the intensity range, then clipped)."""

    crop_padding: int = 0
    hflip: bool = False
    noise_std: float = 0.0


def decode_image(path: Path, fmt: ImageFormat) -> np.ndarray:
    """Decode one image file to (H, W, C) uint8, resized to ``fmt`` when needed."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if fmt.channels == 1 else "RGB")
            if image.size != (fmt.width, fmt.height):
                image = image.resize((fmt.width, fmt.height), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise ManifestError(f"{path}: image file cannot be decoded ({err}).") from None
    return pixels.reshape(fmt.height, fmt.width, fmt.channels)


class ManifestSource(grain.sources.RandomAccessDataSource):
    """Grain random-access source: item i = {"image", "y", "t"} of a joined split."""

    def __init__(self, split: SplitData, fmt: ImageFormat):
        self.split = split
        self.fmt = fmt

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        return {
            "image": decode_image(self.split.root / self.split.files[index], self.fmt),
            "y": self.split.y[index],
            "t": self.split.t[index],
        }


@dataclass(frozen=True)
class ArraySplit:
    """A split decoded into memory: images (N, H, W, C) uint8, y (N,), t (N, E)."""

    images: np.ndarray
    y: np.ndarray
    t: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def _cache_key(split: SplitData, fmt: ImageFormat, signature: str) -> str:
    digest = hashlib.sha256(repr(fmt).encode() + signature.encode())
    for file in split.files:
        digest.update(file.encode() + b"\0")
    return digest.hexdigest()[:16]


def decode_all(
    split: SplitData, fmt: ImageFormat, cache_dir: str | Path | None = None, progress: bool = True,
    signature: str = "",
) -> ArraySplit:
    """Decode every image of ``split`` once (cached as .npz under ``cache_dir`` if given).

    The cache file is keyed by the format, the file list and ``signature`` (the caller's
    hash of the images' sizes and modification times), so a replaced image is decoded again.
    """
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"images-{_cache_key(split, fmt, signature)}.npz"
        if cache_path.is_file():
            with np.load(cache_path) as cached:
                return ArraySplit(images=cached["images"], y=split.y, t=split.t)
    source = ManifestSource(split, fmt)
    indices = range(len(source))
    if progress and len(source) > 2000:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"decoding {split.root.name}", unit="img", leave=False)
    images = np.stack([decode_image(split.root / split.files[i], fmt) for i in indices])
    if cache_path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, images=images)
        atomic_write_bytes(cache_path, buffer.getvalue())
    return ArraySplit(images=images, y=split.y, t=split.t)


def normalise(
    images: np.ndarray, mean: np.ndarray, std: np.ndarray, noise: np.ndarray | None = None
) -> np.ndarray:
    """uint8 (..., C) -> float32 ``(clip(x / 255 + noise, 0, 1) - mean) / std``."""
    pixels = images.astype(np.float32) / 255.0
    if noise is not None:
        pixels = np.clip(pixels + noise, 0.0, 1.0)
    return (pixels - mean) / std


def pixel_noise(shape, augment: Augment, rng: np.random.Generator) -> np.ndarray | None:
    """The additive noise of ``augment`` for a batch of ``shape`` (None when off)."""
    if augment.noise_std <= 0:
        return None
    return (augment.noise_std * rng.standard_normal(shape)).astype(np.float32)


def augment_batch(images: np.ndarray, augment: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random crop (zero padding) and horizontal flip of a (B, H, W, C) batch."""
    b, h, w, _ = images.shape
    pad = augment.crop_padding
    if pad > 0:
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        dy = rng.integers(0, 2 * pad + 1, size=b)
        dx = rng.integers(0, 2 * pad + 1, size=b)
        rows = dy[:, None] + np.arange(h)[None, :]
        cols = dx[:, None] + np.arange(w)[None, :]
        images = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if augment.hflip:
        flip = rng.random(b) < 0.5
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return images


@dataclass(frozen=True)
class LoaderConfig:
    """Batching and preprocessing of one split."""

    batch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = Augment()
    drop_remainder: bool = False
    crop: int | None = None  # square crop: random in training batches, centred otherwise


def crop_batch(images: np.ndarray, size: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """A ``size`` x ``size`` crop of each (B, H, W, C) image: at a random offset per image
    when ``rng`` is given (training), else centred (evaluation); None keeps the images."""
    if size is None:
        return images
    b, h, w, _ = images.shape
    if size > min(h, w):
        raise ValueError(f"crop {size} is larger than the decoded images ({h}x{w}); "
                         "raise dataset.image or lower dataset.crop.")
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
        return images[:, top:top + size, left:left + size]
    dy = rng.integers(0, h - size + 1, size=b)
    dx = rng.integers(0, w - size + 1, size=b)
    rows = dy[:, None] + np.arange(size)[None, :]
    cols = dx[:, None] + np.arange(size)[None, :]
    return images[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def epoch_batches(
    data: ArraySplit, config: LoaderConfig, *, seed: int, epoch: int, shuffle: bool = True,
    corrupt: bool = False,
) -> Iterator[Batch]:
    """Batches of one epoch from an in-memory split, shuffled by Grain under (seed, epoch).

    Shuffled (training) batches are augmented; unshuffled ones are not, but ``corrupt``
    still adds the pixel noise (``augment.noise_std``), one draw fixed by (seed, epoch):
    held-out training images then look like test images that carry baked-in noise.
    """
    indices = grain.MapDataset.range(len(data))
    if shuffle:
        indices = indices.shuffle(seed=_epoch_seed(seed, epoch))
    batches = indices.batch(config.batch_size, drop_remainder=config.drop_remainder)
    rng = np.random.default_rng([seed, epoch, 1])
    mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
    for rows in batches:
        rows = np.asarray(rows)
        images, noise = data.images[rows], None
        images = crop_batch(images, config.crop, rng if shuffle else None)
        if shuffle:
            images = augment_batch(images, config.augment, rng)
        if shuffle or corrupt:
            noise = pixel_noise(images.shape, config.augment, rng)
        yield Batch(x=normalise(images, mean, std, noise), y=data.y[rows], t=data.t[rows])


def stream_batches(
    source: ManifestSource, config: LoaderConfig, *, seed: int, epoch: int, num_threads: int = 4
) -> Iterator[Batch]:
    """Batches of one epoch decoded on the fly (large datasets), prefetched by Grain."""
    mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
    rng = np.random.default_rng([seed, epoch, 2])
    dataset = (
        grain.MapDataset.source(source)
        .shuffle(seed=_epoch_seed(seed, epoch))
        .batch(config.batch_size, drop_remainder=config.drop_remainder)
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
    )
    for batch in dataset:
        images = augment_batch(crop_batch(batch["image"], config.crop, rng), config.augment, rng)
        noise = pixel_noise(images.shape, config.augment, rng)
        yield Batch(x=normalise(images, mean, std, noise), y=batch["y"], t=batch["t"])


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch]).integers(0, 2**31 - 1))
