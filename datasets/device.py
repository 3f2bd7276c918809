"""An in-memory split on the accelerator, and its training batches built there.

``put_split`` moves a decoded split (uint8 images, ground truth, expert labels) to the
device once. ``device_batch`` is a pure, jittable function: it gathers a batch's rows,
draws the random crop, horizontal flip and pixel noise of ``LoaderConfig`` from a JAX key
and normalises, so a whole epoch of training can run as one program (``lax.scan``) with
no batch crossing from the host. The rows of each epoch are Grain's shuffle
(``epoch_rows``), the same rows in the same batches as ``source.epoch_batches``; the random
draws come from JAX's generator instead of numpy's, so augmented pixels differ while their
distribution is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from core.spec import Batch
from datasets.source import ArraySplit, LoaderConfig, check_crop, epoch_order, epoch_seed


@dataclass(frozen=True)
class DeviceSplit:
    """A split's arrays on the device: images (N, H, W, C) uint8, y (N,), t (N, E)."""

    images: jax.Array
    y: jax.Array
    t: jax.Array


jax.tree_util.register_dataclass(DeviceSplit, data_fields=["images", "y", "t"], meta_fields=[])


def put_split(split: ArraySplit, sharding=None) -> DeviceSplit:
    """``split`` copied to the device once (replicated over ``sharding``'s devices if given)."""
    arrays = (np.asarray(split.images, np.uint8), np.asarray(split.y, np.int32),
              np.asarray(split.t, np.int32))
    return DeviceSplit(*(jax.device_put(a, sharding) for a in arrays))


def epoch_rows(length: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, batch_size) int32 rows of one training epoch: Grain's shuffle under
    (seed, epoch), the last incomplete batch dropped (as ``source.epoch_batches`` with
    ``drop_remainder``)."""
    order = epoch_order(length, epoch_seed(seed, epoch))
    steps = length // batch_size
    return order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def _random_window(images: jax.Array, height: int, width: int, key: jax.Array) -> jax.Array:
    """A (height, width) window of each (B, H, W, C) image at a uniform random offset."""
    b, h, w, c = images.shape
    key_y, key_x = jax.random.split(key)
    dy = jax.random.randint(key_y, (b,), 0, h - height + 1)
    dx = jax.random.randint(key_x, (b,), 0, w - width + 1)
    def window(image, y0, x0):
        return jax.lax.dynamic_slice(image, (y0, x0, 0), (height, width, c))

    return jax.vmap(window)(images, dy, dx)


def device_batch(split: DeviceSplit, rows: jax.Array, key: jax.Array, config: LoaderConfig) -> Batch:
    """The training batch of ``rows`` (jittable): random ``config.crop``, then the
    augmentations of ``config.augment`` (pad-and-crop, flip, noise) drawn from ``key``,
    then ``(clip(x / 255 + noise, 0, 1) - mean) / std`` as ``source.normalise``."""
    images = jnp.take(split.images, rows, axis=0)
    key_crop, key_pad, key_flip, key_noise = jax.random.split(key, 4)
    if config.crop is not None:
        check_crop(config.crop, *images.shape[1:3])
        images = _random_window(images, config.crop, config.crop, key_crop)
    augment = config.augment
    if augment.crop_padding > 0:
        pad = augment.crop_padding
        b, h, w, _ = images.shape
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        images = _random_window(padded, h, w, key_pad)
    if augment.hflip:
        flip = jax.random.bernoulli(key_flip, 0.5, (images.shape[0],))
        images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    pixels = images.astype(jnp.float32) / 255.0
    if augment.noise_std > 0:
        noise = augment.noise_std * jax.random.normal(key_noise, pixels.shape, jnp.float32)
        pixels = jnp.clip(pixels + noise, 0.0, 1.0)
    mean = jnp.asarray(config.mean, jnp.float32)
    std = jnp.asarray(config.std, jnp.float32)
    return Batch(x=(pixels - mean) / std, y=jnp.take(split.y, rows), t=jnp.take(split.t, rows, axis=0))
