"""Shared network backbones (Flax NNX) and the heads methods put on them.

Backbones map (B, H, W, C) images to (B, D) features:
- ``small_cnn``: three 3x3 conv layers + global average pool, for small images (default).
- ``preact_resnet18``: PreAct-ResNet18 with a 3x3 stem, for 32x32 images (CIFAR).
- ``resnet18``: ResNet18 with a 7x7 stride-2 stem and max-pool, for 224x224 images.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from core.registry import Registry

BACKBONES: Registry = Registry("backbone")
CONV_IMPLEMENTATIONS = ("auto", "native", "matmul")


def conv_implementation() -> str:
    """``native`` (XLA's convolution) or ``matmul`` (shifted slices + one matmul).

    ``auto`` (default; ``L2D_CONV`` overrides it) picks ``native`` on every backend: with
    the pinned JAX, the train-step benchmark measures XLA:CPU's own convolution at least as
    fast as the matmul formulation at 16x16 and 32x32 (README, Performance), and no
    accelerator was measured. ``matmul`` stays available as the benchmark's alternative.
    """
    choice = os.environ.get("L2D_CONV", "auto")
    if choice not in CONV_IMPLEMENTATIONS:
        raise ValueError(f"L2D_CONV={choice!r} is not one of {', '.join(CONV_IMPLEMENTATIONS)}.")
    return "native" if choice == "auto" else choice


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_as_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """SAME-padded 2-D convolution (NHWC, HWIO kernel) as shifted slices + one matmul.

    Equal to ``lax.conv_general_dilated(..., padding="SAME")``; its gradient is matmuls,
    pads and adds, which XLA:CPU runs far faster than its convolution gradient.
    """
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    (top, bottom), (left, right) = (_same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw))
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = -(-x.shape[1] // sh), -(-x.shape[2] // sw)
    patches = [padded[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
               for i in range(kh) for j in range(kw)]
    columns = jnp.concatenate(patches, axis=-1) if len(patches) > 1 else patches[0]
    return columns @ kernel.reshape(kh * kw * cin, cout)


class Conv(nnx.Conv):
    """``nnx.Conv`` (same parameters, same results) computed by ``conv_as_matmul`` where
    ``conv_implementation()`` says so; other configurations use the native path."""

    def __call__(self, x: jax.Array) -> jax.Array:
        simple = (self.padding == "SAME" and self.feature_group_count == 1
                  and self.kernel_dilation in (1, (1, 1), None) and self.input_dilation in (1, (1, 1), None)
                  and x.ndim == 4)
        if not simple or conv_implementation() != "matmul":
            return super().__call__(x)
        strides = self.strides if isinstance(self.strides, Sequence) else (self.strides, self.strides)
        y = conv_as_matmul(x, self.kernel[...], tuple(strides))
        return y + self.bias[...] if self.bias is not None else y


@BACKBONES.register("small_cnn")
class SmallCNN(nnx.Module):
    """conv(w)-conv(2w)-pool-conv(2w)-pool to 4x4-dense(64); w = 16 by default.

    Pooling to a fixed 4x4 grid (not a global mean) keeps where strokes are, which small
    images such as 8x8 digits need.
    """

    grid = 4

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, width: int = 16):
        self.conv1 = Conv(in_channels, width, (3, 3), rngs=rngs)
        self.conv2 = Conv(width, 2 * width, (3, 3), rngs=rngs)
        self.conv3 = Conv(2 * width, 2 * width, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(self.grid * self.grid * 2 * width, 64, rngs=rngs)
        self.features = 64

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        if x.shape[1] >= 2 * self.grid:
            x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv3(x))
        window = (max(x.shape[1] // self.grid, 1), max(x.shape[2] // self.grid, 1))
        x = nnx.avg_pool(x, window, strides=window)
        if x.shape[1] != self.grid or x.shape[2] != self.grid:
            raise ValueError(f"small_cnn needs inputs of at least {self.grid}x{self.grid} "
                             f"with sides a multiple of {self.grid}; got {x.shape[1:3]} after pooling.")
        return nnx.relu(self.dense(x.reshape(x.shape[0], -1)))


class _PreActBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.bn1 = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
        self.conv1 = Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.conv2 = Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.shortcut = nnx.data(
            Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            if stride != 1 or cin != cout
            else None
        )

    def __call__(self, x):
        out = nnx.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(nnx.relu(self.bn2(out)))
        return out + skip


class _BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.conv2 = Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        needs_projection = stride != 1 or cin != cout
        self.shortcut = nnx.data(
            Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            if needs_projection
            else None
        )
        self.shortcut_bn = nnx.data(
            nnx.BatchNorm(cout, momentum=0.9, rngs=rngs) if needs_projection else None
        )

    def __call__(self, x):
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.shortcut_bn(self.shortcut(x)) if self.shortcut is not None else x
        return nnx.relu(out + skip)


def _stages(block, widths: Sequence[int], rngs: nnx.Rngs) -> nnx.List:
    layers, cin = [], widths[0]
    for stage, cout in enumerate(widths):
        for i in range(2):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(block(cin, cout, stride, rngs=rngs))
            cin = cout
    return nnx.List(layers)


@BACKBONES.register("preact_resnet18")
class PreActResNet18(nnx.Module):
    """PreAct-ResNet18 (3x3 stem, no max-pool) for 32x32 inputs."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, width: int = 64):
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = Conv(in_channels, width, (3, 3), use_bias=False, rngs=rngs)
        self.blocks = _stages(_PreActBlock, widths, rngs)
        self.bn = nnx.BatchNorm(widths[-1], momentum=0.9, rngs=rngs)
        self.features = widths[-1]

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return nnx.relu(self.bn(x)).mean(axis=(1, 2))


@BACKBONES.register("resnet18")
class ResNet18(nnx.Module):
    """ResNet18 (7x7 stride-2 stem + max-pool) for 224x224 inputs."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, width: int = 64):
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = Conv(in_channels, width, (7, 7), strides=2, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.blocks = _stages(_BasicBlock, widths, rngs)
        self.features = widths[-1]

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x)
        return x.mean(axis=(1, 2))


class Network(nnx.Module):
    """A backbone followed by a linear head with ``num_outputs`` logits."""

    def __init__(self, backbone: str, in_channels: int, num_outputs: int, *, rngs: nnx.Rngs):
        self.backbone = BACKBONES.get(backbone)(in_channels, rngs=rngs)
        self.head = nnx.Linear(self.backbone.features, num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.backbone(x))


class NetworkStack(nnx.Module):
    """``count`` independent networks of the same shape, evaluated together.

    Calling it on (B, H, W, C) returns (count, B, num_outputs). The networks are a list
    unrolled inside ``jit`` rather than one vmapped network: a vmap over convolution
    weights lowers to grouped convolutions, which XLA's CPU backend runs far slower.
    """

    def __init__(
        self, count: int, backbone: str, in_channels: int, num_outputs: int, *, rngs: nnx.Rngs
    ):
        self.nets = nnx.List(
            [Network(backbone, in_channels, num_outputs, rngs=rngs) for _ in range(count)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.stack([net(x) for net in self.nets])
