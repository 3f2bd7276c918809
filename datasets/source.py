"""The only module that opens image files: Grain data sources and the batch loaders.

``StreamedSplit`` is the random-access source Grain reads: item ``i`` is the decoded image
with its ground truth and expert labels. Small datasets are decoded
once into memory (``decode_all`` -> ``ArraySplit``, cached on disk as ``.npz`` keyed by the
manifests) and batched by gathering rows; large ones stay on disk (``StreamedSplit``) and
stream through a Grain pipeline that decodes and preprocesses each sample in worker
threads and processes. ``epoch_batches`` serves both with the same batch order.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, cast

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from core.files import read_cache, write_cache
from core.spec import Batch
from datasets.layout import SplitData
from datasets.manifest import ManifestError


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
        with Image.open(path) as file:
            image = file.convert("L" if fmt.channels == 1 else "RGB")
            if image.size != (fmt.width, fmt.height):
                image = image.resize((fmt.width, fmt.height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise ManifestError(f"{path}: image file cannot be decoded ({err}).") from None
    return pixels.reshape(fmt.height, fmt.width, fmt.channels)


@dataclass(frozen=True)
class ArraySplit:
    """A split decoded into memory: images (N, H, W, C) uint8, y (N,), t (N, E)."""

    images: np.ndarray
    y: np.ndarray
    t: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, rows: np.ndarray, t: np.ndarray | None = None) -> "ArraySplit":
        """The split's ``rows`` (expert labels taken from ``t`` instead when given)."""
        return ArraySplit(images=self.images[rows], y=self.y[rows],
                          t=(self.t if t is None else t)[rows])


@dataclass(frozen=True, eq=False)
class StreamedSplit:
    """A split left on disk: item ``row`` is ``{"row", "image", "y", "t"}``, the image
    decoded when read. Same ``len``/``y``/``t``/``subset`` as ``ArraySplit``, no pixels."""

    root: Path
    files: tuple[str, ...]
    fmt: ImageFormat
    y: np.ndarray
    t: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:  # short: Grain names its source in logs and errors
        return f"StreamedSplit({self.root}, {len(self)} images, {self.fmt})"

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        row = int(row)
        return {"row": np.int64(row), "image": decode_image(self.root / self.files[row], self.fmt),
                "y": self.y[row], "t": self.t[row]}

    def subset(self, rows: np.ndarray, t: np.ndarray | None = None) -> "StreamedSplit":
        """The split's ``rows`` (expert labels taken from ``t`` instead when given)."""
        return StreamedSplit(self.root, tuple(self.files[int(i)] for i in rows), self.fmt,
                             self.y[rows], (self.t if t is None else t)[rows])


def stream_split(split: SplitData, fmt: ImageFormat) -> StreamedSplit:
    """``split`` as a ``StreamedSplit``: nothing is decoded until batches are drawn."""
    return StreamedSplit(split.root, split.files, fmt, split.y, split.t)


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
    hash of the images' content), so an edited image is decoded again; a corrupt cache file
    is named, deleted and decoded again.
    """
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"images-{_cache_key(split, fmt, signature)}.npz"
        cached = read_cache(cache_path, lambda saved: saved["images"], "decoded images")
        if cached is not None:
            return ArraySplit(images=cached, y=split.y, t=split.t)
    indices = range(len(split))
    if progress and len(split) > 2000:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"decoding {split.root.name}", unit="img", leave=False)
    images = np.stack([decode_image(split.root / split.files[i], fmt) for i in indices])
    if cache_path is not None:
        write_cache(cache_path, images=images)
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
        dy = rng.integers(0, 2 * pad + 1, size=(b,))
        dx = rng.integers(0, 2 * pad + 1, size=(b,))
        rows = dy[:, None] + np.arange(h)[None, :]
        cols = dx[:, None] + np.arange(w)[None, :]
        images = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if augment.hflip:
        flip = rng.random((b,)) < 0.5
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
    workers: int = 0  # streamed splits: worker processes (0 = threads of this process only)


def check_crop(size: int, h: int, w: int) -> None:
    """Raise a ``ValueError`` naming the options when a ``size`` crop does not fit h x w."""
    if size > min(h, w):
        raise ValueError(f"crop {size} is larger than the decoded images ({h}x{w}); "
                         "raise dataset.image or lower dataset.crop.")


def crop_batch(images: np.ndarray, size: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """A ``size`` x ``size`` crop of each (B, H, W, C) image: at a random offset per image
    when ``rng`` is given (training), else centred (evaluation); None keeps the images."""
    if size is None:
        return images
    b, h, w, _ = images.shape
    check_crop(size, h, w)
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
        return images[:, top:top + size, left:left + size]
    dy = rng.integers(0, h - size + 1, size=b)
    dx = rng.integers(0, w - size + 1, size=b)
    rows = dy[:, None] + np.arange(size)[None, :]
    cols = dx[:, None] + np.arange(size)[None, :]
    return images[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


@functools.lru_cache(maxsize=512)
def epoch_order(length: int, seed: int) -> np.ndarray:
    """Grain's shuffle of ``range(length)`` under ``seed`` as one read-only array, memoised:
    every method trained with a run seed walks the same epoch orders."""
    shuffled = grain.MapDataset.range(length).shuffle(seed=seed)
    order = np.fromiter((shuffled[i] for i in range(length)), np.int64, length)
    order.setflags(write=False)
    return order


def epoch_batches(
    data: ArraySplit | StreamedSplit, config: LoaderConfig, *, seed: int, epoch: int,
    shuffle: bool = True, corrupt: bool = False,
) -> Iterator[Batch]:
    """Batches of one epoch, shuffled by Grain under (seed, epoch).

    Shuffled (training) batches are augmented; unshuffled ones are not, but ``corrupt``
    still adds the pixel noise (``augment.noise_std``), one draw fixed by (seed, epoch):
    held-out training images then look like test images that carry baked-in noise.

    An in-memory split draws the random crops, flips and noise batch by batch from one
    (seed, epoch) generator; a streamed split (``_stream_epoch``) draws them per sample
    from a (seed, epoch, row) generator. Both give the same rows in the same batches and,
    without augmentation or noise, the same pixels; the random draws differ.
    """
    if isinstance(data, StreamedSplit):
        yield from _stream_epoch(data, config, seed=seed, epoch=epoch, shuffle=shuffle,
                                 corrupt=corrupt)
        return
    order = epoch_order(len(data), epoch_seed(seed, epoch)) if shuffle else np.arange(len(data))
    stop = len(order) - len(order) % config.batch_size if config.drop_remainder else len(order)
    rng = np.random.default_rng([seed, epoch, 1])
    mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
    for start in range(0, stop, config.batch_size):
        rows = order[start:start + config.batch_size]
        images, noise = data.images[rows], None
        images = crop_batch(images, config.crop, rng if shuffle else None)
        if shuffle:
            images = augment_batch(images, config.augment, rng)
        if shuffle or corrupt:
            noise = pixel_noise(images.shape, config.augment, rng)
        yield host_batch(normalise(images, mean, std, noise), data.y[rows], data.t[rows])


def crop_one(image: np.ndarray, size: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """``crop_batch`` for one (H, W, C) image, by slicing."""
    if size is None:
        return image
    h, w, _ = image.shape
    check_crop(size, h, w)
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = (int(v) for v in rng.integers(0, [h - size + 1, w - size + 1]))
    return image[top:top + size, left:left + size]


def augment_one(image: np.ndarray, augment: Augment, rng: np.random.Generator) -> np.ndarray:
    """``augment_batch`` for one (H, W, C) image, by slicing."""
    h, w, _ = image.shape
    pad = augment.crop_padding
    if pad > 0:
        dy, dx = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))[dy:dy + h, dx:dx + w]
    if augment.hflip and rng.random() < 0.5:
        image = image[:, ::-1]
    return image


@dataclass(frozen=True)
class _Preprocess:
    """Crop, augment, add noise to and normalise one streamed sample (picklable: it runs
    in Grain's worker processes). Its randomness depends only on (seed, epoch, row)."""

    config: LoaderConfig
    seed: int
    epoch: int
    train: bool
    corrupt: bool

    def __call__(self, item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        config = self.config
        rng = np.random.default_rng([self.seed, self.epoch, 2, int(item["row"])])
        image = crop_one(item["image"], config.crop, rng if self.train else None)
        if self.train:
            image = augment_one(image, config.augment, rng)
        noise = pixel_noise(image.shape, config.augment, rng) if self.train or self.corrupt else None
        x = normalise(image, np.asarray(config.mean, np.float32),
                      np.asarray(config.std, np.float32), noise)
        return {"x": x, "y": item["y"], "t": item["t"]}


STREAM_THREADS = 4  # batches prepared concurrently per process (PIL releases the GIL to decode)


def _stream_epoch(
    data: StreamedSplit, config: LoaderConfig, *, seed: int, epoch: int, shuffle: bool,
    corrupt: bool,
) -> Iterator[Batch]:
    """One epoch of a streamed split: Grain source -> shuffle -> per-sample decode and
    preprocess -> batch, prefetched by ``STREAM_THREADS`` threads in each of
    ``config.workers`` processes. Each worker builds whole batches (worker i the batches
    i, i + W, ...) and Grain interleaves them back in order, so the output does not depend
    on the worker count."""
    records = grain.MapDataset.source(data)
    if shuffle:
        records = records.shuffle(seed=epoch_seed(seed, epoch))
    records = records.map(_Preprocess(config, seed, epoch, train=shuffle, corrupt=corrupt))
    batches = records.batch(config.batch_size, drop_remainder=config.drop_remainder)
    stream = batches.to_iter_dataset(
        grain.ReadOptions(num_threads=STREAM_THREADS, prefetch_buffer_size=STREAM_THREADS))
    if config.workers > 0:
        _absl_flags_defaults()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.workers, per_worker_buffer_size=2))
    iterator = iter(stream)
    try:
        for batch in iterator:  # copies: workers' arrays live in shared memory until freed
            yield host_batch(*(np.array(batch[key]) for key in ("x", "y", "t")))
    finally:  # stops the worker processes even when the caller leaves early
        iterator.close()


def host_batch(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> Batch:
    """A ``Batch`` of host (numpy) arrays; a jitted step takes them as it takes device arrays."""
    return Batch(*cast(Any, (x, y, t)))


def _absl_flags_defaults() -> None:
    """Grain 0.2.18 reads an absl flag when it starts worker processes and fails unless
    flags were parsed (google/grain#1355): outside an absl app, take every default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def epoch_seed(seed: int, epoch: int) -> int:
    """The Grain shuffle seed of a run seed's epoch."""
    return int(np.random.default_rng([seed, epoch]).integers(0, 2**31 - 1))
