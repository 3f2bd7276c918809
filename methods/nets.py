"""Shared network backbones (Flax NNX) and the heads methods put on them.

Backbones map (B, H, W, C) images to (B, D) features:
- ``small_cnn``: three 3x3 conv layers + global average pool, for small images (default).
- ``preact_resnet18``: PreAct-ResNet18 with a 3x3 stem, for 32x32 images (CIFAR).
- ``resnet18``: ResNet18 with a 7x7 stride-2 stem and max-pool, for 224x224 images.

Every convolution is a ``Conv``, computed as ``conv_implementation`` picks (XLA's own, or
im2col GEMMs); ``set_compute_dtype`` makes the backbones compute in bfloat16 with float32
parameters (mixed precision).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from core.compile import jit
from core.files import atomic_write_bytes
from core.registry import Registry

BACKBONES: Registry = Registry("backbone")
CONV_IMPLEMENTATIONS = ("auto", "native", "matmul", "gemm")
# auto times gemm against native only for convolutions of at least AUTO_MIN_FLOPS forward
# FLOPs (below, a wrong choice costs little and a timing costs two compilations) whose
# patch matrix (kh*kw times the input, which gemm materialises) fits in AUTO_MAX_PATCH_BYTES;
# it picks gemm when gemm takes at most AUTO_MARGIN of native's time.
AUTO_MIN_FLOPS, AUTO_MAX_PATCH_BYTES, AUTO_MARGIN = 1e8, 512 * 2**20, 0.85


def conv_implementation(x_shape: Sequence[int] | None = None, kernel_shape: Sequence[int] | None = None,
                        strides: Sequence[int] = (1, 1), dtype=jnp.float32) -> str:
    """The convolution ``Conv`` computes for these shapes: ``native``, ``matmul`` or ``gemm``.

    - ``native``: XLA's convolution (cuDNN on GPU; YNNPACK or Eigen on CPU) and the
      gradient convolutions XLA derives from it.
    - ``matmul``: shifted slices + one matmul (``conv_as_matmul``); XLA derives the gradient.
    - ``gemm``: ``conv_gemm``, forward pass and both gradients one large GEMM each (im2col).

    ``L2D_CONV`` (default ``auto``) names one. ``auto`` answers ``native`` on accelerators
    and without shapes; on the CPU it times ``native`` against ``gemm`` once per
    (CPU, shape, strides, dtype) (forward and both gradients, best of 3; ``AUTO_*`` above),
    keeps the answer for the process and in ``l2d_conv_choices.json`` beside JAX's
    compilation cache, and picks ``gemm`` only where it is clearly faster. Measured:

    - CPU, a timing rather than a rule, since the order depends on the CPU and no rule
      could be measured: on a 2-core AMD EPYC with AVX-512 (jax 0.10.2) native is 2-3x
      faster than gemm and matmul in the train step (small_cnn classifier_only, batch 128,
      interleaved runs: 12.1, 34.4 and 38.4 ms at 16x16; 46.6, 87.2 and 93.6 ms at 32x32),
      while single layers of preact_resnet18 with stride 2, or at 4x4 with 512 channels,
      time faster as gemm; an AVX2-only EPYC measured 618 ms native and 494 ms matmul at
      32x32. ``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` does not stand in for that CPU: it limits
      XLA's generated code, not the YNNPACK and Eigen kernels that run convolutions and
      matmuls, which pick their instructions from the real CPU (the same times with and
      without it, here). small_cnn's convolutions run on slices of the batch below
      ``AUTO_MIN_FLOPS``, so auto gives native there.
    - GPU: native. On an H200 (jax 0.11.2, batch 128, a loss's gradient) preact_resnet18 at
      32x32 takes 5.0 ms native against 7.1 gemm and 7.3 matmul in float32, 3.5 against 5.7
      and 6.5 in bfloat16; small_cnn takes under 1 ms whichever is used.
    """
    choice = os.environ.get("L2D_CONV", "auto")
    if choice not in CONV_IMPLEMENTATIONS:
        raise ValueError(f"L2D_CONV={choice!r} is not one of {', '.join(CONV_IMPLEMENTATIONS)}.")
    if choice != "auto":
        return choice
    if x_shape is None or kernel_shape is None or jax.default_backend() != "cpu":
        return "native"
    return _timed_choice(tuple(x_shape), tuple(kernel_shape), tuple(strides), jnp.dtype(dtype).name)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _patches(x: jax.Array, kh: int, kw: int, strides: tuple[int, int]) -> jax.Array:
    """(B, H', W', kh*kw*C): the SAME-padded patches of NHWC ``x``, in (i, j, c) order."""
    sh, sw = strides
    (top, bottom), (left, right) = (_same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw))
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = -(-x.shape[1] // sh), -(-x.shape[2] // sw)
    patches = [padded[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
               for i in range(kh) for j in range(kw)]
    return jnp.concatenate(patches, axis=-1) if len(patches) > 1 else patches[0]


def _gemm(a: jax.Array, b: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """``a`` and ``b`` contracted over one axis each, accumulated in float32."""
    return lax.dot_general(a, b, (((axes[0],), (axes[1],)), ((), ())), preferred_element_type=jnp.float32)


def conv_as_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """SAME-padded 2-D convolution (NHWC, HWIO kernel) as shifted slices + one matmul;
    XLA derives its gradient. Equal to ``lax.conv_general_dilated(..., padding="SAME")``;
    float32 accumulation, result in ``x.dtype``."""
    kh, kw, cin, cout = kernel.shape
    return _gemm(_patches(x, kh, kw, strides), kernel.reshape(kh * kw * cin, cout), (3, 0)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_gemm(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """SAME-padded 2-D convolution (NHWC, HWIO kernel) whose forward pass and both
    gradients are one large GEMM each (float32 accumulation, results in the inputs' dtypes):

    - forward: patches (B*H'*W', kh*kw*Cin) @ kernel (kh*kw*Cin, Cout);
    - kernel gradient: patches^T @ dy, one GEMM over every output pixel;
    - input gradient: dy @ kernel^T, (B*H'*W', kh*kw*Cin), folded back onto the input
      (col2im) as kh*kw shifted, stride-dilated pads summed in one fusion.

    The backward pass keeps only ``x`` and ``kernel`` and rebuilds the patches (kh*kw times
    the input's size). Equal to ``lax.conv_general_dilated(..., padding="SAME")``.
    """
    kh, kw, cin, cout = kernel.shape
    return _gemm(_patches(x, kh, kw, strides), kernel.reshape(kh * kw * cin, cout), (3, 0)).astype(x.dtype)


def _conv_gemm_fwd(x, kernel, strides):
    return conv_gemm(x, kernel, strides), (x, kernel)


def _conv_gemm_bwd(strides, residuals, dy):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    patches = _patches(x, kh, kw, strides).reshape(-1, kh * kw * cin)
    dkernel = _gemm(patches, dy.reshape(-1, cout), (0, 0)).reshape(kernel.shape)
    dpatches = _gemm(dy, kernel.reshape(kh * kw * cin, cout), (3, 1))  # (B, H', W', kh*kw*Cin)
    (top, bottom), (left, right) = (_same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw))
    height, width = x.shape[1] + top + bottom, x.shape[2] + left + right
    out_h, out_w = dy.shape[1], dy.shape[2]
    zero = jnp.zeros((), jnp.float32)
    dpadded = None
    for i in range(kh):
        for j in range(kw):
            block = dpatches[..., (i * kw + j) * cin:(i * kw + j + 1) * cin]
            placed = lax.pad(block, zero, [(0, 0, 0), (i, height - i - (out_h - 1) * sh - 1, sh - 1),
                                           (j, width - j - (out_w - 1) * sw - 1, sw - 1), (0, 0, 0)])
            dpadded = placed if dpadded is None else dpadded + placed
    dx = dpadded[:, top:top + x.shape[1], left:left + x.shape[2], :]
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv_gemm.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def _native_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


ConvFunction = Callable[[jax.Array, jax.Array, tuple[int, int]], jax.Array]  # (x, kernel, strides) -> y
CONV_FUNCTIONS: dict[str, ConvFunction] = {"native": _native_conv, "matmul": conv_as_matmul, "gemm": conv_gemm}
_TIMED_CHOICES: dict[str, str] = {}  # auto's choices in this process


def _choices_file() -> Path | None:
    cache = jax.config.values["jax_compilation_cache_dir"] or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return Path(cache) / "l2d_conv_choices.json" if cache else None


@functools.cache
def _machine() -> str:
    """The CPU, JAX and XLA flags a timed choice holds for."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"{model or platform.processor()}, {os.cpu_count()} cpus, jax {jax.__version__}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")


def _read_choices(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text()) if path is not None and path.exists() else {}
    except (OSError, ValueError):
        return {}


def _timed_choice(x_shape: tuple, kernel_shape: tuple, strides: tuple, dtype: str) -> str:
    kh, kw, cin, cout = kernel_shape
    out_pixels = x_shape[0] * -(-x_shape[1] // strides[0]) * -(-x_shape[2] // strides[1])
    if (2 * out_pixels * kh * kw * cin * cout < AUTO_MIN_FLOPS
            or out_pixels * kh * kw * cin * jnp.dtype(dtype).itemsize > AUTO_MAX_PATCH_BYTES):
        return "native"
    key = f"{_machine()}; x {x_shape}, kernel {kernel_shape}, strides {strides}, {dtype}"
    if key not in _TIMED_CHOICES:
        path = _choices_file()
        saved = _read_choices(path).get(key)
        if saved in CONV_FUNCTIONS:
            _TIMED_CHOICES[key] = saved
        else:
            seconds = time_convolutions(x_shape, kernel_shape, strides, dtype, ("native", "gemm"))
            _TIMED_CHOICES[key] = "gemm" if seconds["gemm"] <= AUTO_MARGIN * seconds["native"] else "native"
            if path is not None:
                try:
                    atomic_write_bytes(path, json.dumps({**_read_choices(path), key: _TIMED_CHOICES[key]},
                                                        indent=1, sort_keys=True).encode())
                except OSError:
                    pass  # the choice still holds for this process
    return _TIMED_CHOICES[key]


def time_convolutions(x_shape, kernel_shape, strides, dtype, names, rounds: int = 3) -> dict[str, float]:
    """Seconds (best of ``rounds``, candidates interleaved) of one forward pass and both
    gradients of each named implementation on random inputs of these shapes."""
    with jax.ensure_compile_time_eval():  # runs now, also when called while tracing
        kx, kk = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, x_shape, jnp.float32).astype(dtype)
        kernel = (0.1 * jax.random.normal(kk, kernel_shape, jnp.float32)).astype(dtype)

        def program(name):
            conv = CONV_FUNCTIONS[name]
            return jit(jax.grad(lambda x, k: jnp.sum(conv(x, k, strides).astype(jnp.float32) ** 2),
                                    argnums=(0, 1)))

        programs = {name: program(name) for name in names}
        for f in programs.values():
            jax.block_until_ready(f(x, kernel))  # compiled outside the timing
        best = dict.fromkeys(names, float("inf"))
        for _ in range(rounds):
            for name, f in programs.items():
                start = time.perf_counter()
                jax.block_until_ready(f(x, kernel))
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def _pair(strides: int | Sequence[int] | None) -> tuple[int, int]:
    """A 2-D convolution's strides as (height, width); None means 1, as in ``nnx.Conv``."""
    if isinstance(strides, Sequence):
        height, width = strides
        return height, width
    return (1, 1) if strides is None else (strides, strides)


class Conv(nnx.Conv):
    """``nnx.Conv`` (same parameters, same results) computed by the implementation
    ``conv_implementation`` names for its shapes (SAME padding without dilation or groups;
    other configurations take the native path). Computes in ``self.dtype`` when it is set
    (``set_compute_dtype``): input and kernel cast to it, float32 accumulation."""

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        """``nnx.Conv``'s call; an ``out_sharding`` takes the native path."""
        simple = (self.padding == "SAME" and self.feature_group_count == 1
                  and self.kernel_dilation in (1, (1, 1), None) and self.input_dilation in (1, (1, 1), None)
                  and x.ndim == 4 and out_sharding is None)
        if not simple:
            return super().__call__(x, out_sharding)
        strides = _pair(self.strides)
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        implementation = conv_implementation(x.shape, kernel.shape, strides, x.dtype)
        if implementation == "native":
            return super().__call__(x)
        y = CONV_FUNCTIONS[implementation](x, kernel, strides)
        return y + bias if bias is not None else y


@BACKBONES.register("small_cnn")
class SmallCNN(nnx.Module):
    """conv(w)-conv(2w)-pool-conv(2w)-pool to 4x4-dense(64); w = 16 by default.

    Pooling to a fixed 4x4 grid (not a global mean) keeps where strokes are, which small
    images such as 8x8 digits need.

    On the CPU a large batch runs as slices of about ``cpu_slice_pixels`` input pixels
    each (at most ``cpu_max_slices`` slices), their features concatenated: the same
    features (nothing here mixes images), but each slice's activations stay in cache
    through the layers. Train step of classifier_only, batch 128, 2-core AMD EPYC (AVX-512),
    sliced against unsliced in the same process: 32x32 46.6 against 78.3 ms, 16x16 12.7
    against 16.5 ms, 8x8 3.6 against 3.9 ms (4,096 pixels a slice; 2,048 and 16,384 were
    slower, and slicing each convolution alone was slower than no slices).
    """

    grid = 4
    cpu_slice_pixels, cpu_max_slices = 4096, 16

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, width: int = 16):
        self.conv1 = Conv(in_channels, width, (3, 3), rngs=rngs)
        self.conv2 = Conv(width, 2 * width, (3, 3), rngs=rngs)
        self.conv3 = Conv(2 * width, 2 * width, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(self.grid * self.grid * 2 * width, 64, rngs=rngs)
        self.features = 64

    def __call__(self, x: jax.Array) -> jax.Array:
        slices = min(-(-x.shape[0] * x.shape[1] * x.shape[2] // self.cpu_slice_pixels), self.cpu_max_slices)
        if slices <= 1 or x.ndim != 4 or jax.default_backend() != "cpu":
            return self.features_of(x)
        size = -(-x.shape[0] // slices)
        return jnp.concatenate([self.features_of(x[i:i + size]) for i in range(0, x.shape[0], size)])

    def features_of(self, x: jax.Array) -> jax.Array:
        """(B, 64) features of (B, H, W, C) images, computed as one batch."""
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


COMPUTED_IN_DTYPE = (nnx.Conv, nnx.Linear, nnx.BatchNorm)


def set_compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
    """Mixed precision: every backbone inside ``model`` (instances of the ``BACKBONES``
    classes) computes in ``dtype`` (e.g. ``jnp.bfloat16``): its Conv, Linear and BatchNorm
    modules cast inputs and parameters to it. Parameters stay float32 (master weights, and
    the optimiser updates them in float32); BatchNorm's statistics and running averages
    stay float32 (flax computes them in at least float32); heads and other modules outside
    the backbones keep float32 (a float32 Linear fed bfloat16 features computes in float32,
    so logits and losses are float32). ``dtype`` None, ``"fp32"`` or float32 leaves the
    model as it is. The dtype is a static attribute: ``nnx.split``'s graphdef carries it,
    so a step jitted on the graphdef compiles once per precision. Returns ``model``.
    """
    if dtype is None or (isinstance(dtype, str) and dtype.lower() in ("fp32", "float32")):
        return model
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return model
    backbones = tuple(BACKBONES.get(name) for name in BACKBONES.names())
    for _, module in nnx.iter_modules(model):
        if isinstance(module, backbones):
            for _, layer in nnx.iter_modules(module):
                if isinstance(layer, COMPUTED_IN_DTYPE):
                    layer.dtype = dtype
    return model
