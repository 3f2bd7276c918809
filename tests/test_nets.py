"""Convolutions (``L2D_CONV``: native, matmul, gemm, auto) agree with XLA's native one, values
and gradients; small_cnn's CPU slices give the unsliced results; mixed precision
(``set_compute_dtype``) keeps float32 parameters, statistics and logits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import methods.nets as nets
from methods.nets import (
    BACKBONES,
    Conv,
    Network,
    SmallCNN,
    conv_as_matmul,
    conv_gemm,
    conv_implementation,
    set_compute_dtype,
)


def native_conv(x, kernel, strides):
    return lax.conv_general_dilated(x, kernel, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("implementation", [conv_gemm, conv_as_matmul])
@pytest.mark.parametrize("kernel,stride,size", [
    ((3, 3), 1, 8), ((3, 3), 2, 9), ((3, 3), 2, 8), ((1, 1), 1, 6), ((1, 1), 2, 7), ((7, 7), 2, 16),
    ((3, 3), 1, 5),
])
def test_convolution_equals_the_native_one_values_and_gradients(implementation, kernel, stride, size):
    """Random inputs, SAME padding: the output and both gradients of a non-linear loss."""
    kx, kk, kg = jax.random.split(jax.random.key(size * 10 + stride), 3)
    x = jax.random.normal(kx, (3, size, size, 4))
    w = jax.random.normal(kk, (*kernel, 4, 6))
    strides = (stride, stride)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides)))

    np.testing.assert_allclose(implementation(x, w, strides), native_conv(x, w, strides), rtol=1e-5, atol=1e-4)
    expected = jax.grad(loss(native_conv), argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(loss(implementation), argnums=(0, 1)))(x, w)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,size,bias", [
    ((3, 3), 1, 8, True), ((3, 3), 2, 9, False), ((1, 1), 2, 7, False), ((7, 7), 2, 16, False),
])
@pytest.mark.parametrize("implementation", ["matmul", "gemm"])
def test_conv_module_equals_the_native_one(monkeypatch, implementation, kernel, stride, size, bias):
    conv = Conv(3, 5, kernel, strides=stride, use_bias=bias, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))

    def outputs_and_grads(name):
        monkeypatch.setenv("L2D_CONV", name)
        assert conv_implementation(x.shape, conv.kernel.shape, (stride, stride)) == name
        grad_model, grad_x = jax.grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))(conv, x)
        return conv(x), grad_model, grad_x

    native, other = outputs_and_grads("native"), outputs_and_grads(implementation)
    assert other[0].shape == native[0].shape
    np.testing.assert_allclose(other[0], native[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other[2], native[2], rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(nnx.state(other[1])), jax.tree.leaves(nnx.state(native[1]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_auto_and_the_override(monkeypatch):
    monkeypatch.delenv("L2D_CONV", raising=False)
    assert conv_implementation() == "native"  # no shapes: native
    # a convolution under AUTO_MIN_FLOPS is not timed: native
    assert conv_implementation((2, 8, 8, 3), (3, 3, 3, 16)) == "native"
    monkeypatch.setenv("L2D_CONV", "fast")
    with pytest.raises(ValueError, match="L2D_CONV='fast' is not one of auto, native, matmul, gemm"):
        conv_implementation()


def test_auto_times_large_convolutions_once_and_keeps_the_choice(monkeypatch, tmp_path):
    """On the CPU, auto times native against gemm once per shape (inside a trace too),
    keeps the answer in the process and on disk, and picks gemm only when clearly faster."""
    monkeypatch.delenv("L2D_CONV", raising=False)
    monkeypatch.setattr(nets, "AUTO_MIN_FLOPS", 0)
    monkeypatch.setattr(nets, "_TIMED_CHOICES", {})
    path = tmp_path / "l2d_conv_choices.json"
    monkeypatch.setattr(nets, "_choices_file", lambda: path)
    timings = iter([{"native": 1.0, "gemm": 0.5}, {"native": 1.0, "gemm": 0.9}])
    calls = []

    def fake_timing(*args):
        calls.append(args)
        return next(timings)

    monkeypatch.setattr(nets, "time_convolutions", fake_timing)
    conv = Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    x = jnp.ones((2, 8, 8, 3))
    if jax.default_backend() != "cpu":
        assert conv_implementation(x.shape, conv.kernel.shape) == "native" and not calls
        return
    jax.jit(lambda x: conv(x))(x)  # chosen while tracing
    assert conv_implementation(x.shape, conv.kernel.shape) == "gemm" and len(calls) == 1
    assert list(json.loads(path.read_text()).values()) == ["gemm"]
    monkeypatch.setattr(nets, "_TIMED_CHOICES", {})  # a new process: read from disk, not timed
    assert conv_implementation(x.shape, conv.kernel.shape) == "gemm" and len(calls) == 1
    # gemm 10% faster is within the margin: native
    assert conv_implementation((2, 8, 8, 4), (3, 3, 4, 4)) == "native" and len(calls) == 2
    assert sorted(json.loads(path.read_text()).values()) == ["gemm", "native"]
    np.testing.assert_allclose(jax.jit(lambda x: conv(x))(x), native_conv(x, conv.kernel[...], (1, 1))
                               + conv.bias[...], rtol=1e-5, atol=1e-5)


def test_convolution_timing_runs_inside_a_trace():
    seconds = jax.jit(lambda x: x + sum(nets.time_convolutions(
        (2, 8, 8, 3), (3, 3, 3, 4), (1, 1), "float32", ("native", "gemm"), rounds=1).values()))(0.0)
    assert float(seconds) > 0


@pytest.mark.parametrize("implementation,backbone,size", [
    ("matmul", "small_cnn", 16), ("gemm", "small_cnn", 16), ("gemm", "preact_resnet18", 8),
    # matmul on the ResNets' convolutions (3x3 at strides 1 and 2, the 1x1 stride-2 shortcut,
    # the 7x7 stem): test_conv_module_equals_the_native_one; this pair eagerly costs ~8 s
    pytest.param("matmul", "preact_resnet18", 8, marks=pytest.mark.slow),
])
def test_backbones_agree_across_implementations(monkeypatch, backbone, size, implementation):
    network = Network(backbone, 3, 4, rngs=nnx.Rngs(0))
    network.eval()
    x = jax.random.normal(jax.random.key(2), (2, size, size, 3))
    monkeypatch.setenv("L2D_CONV", "native")
    native = network(x)
    monkeypatch.setenv("L2D_CONV", implementation)
    np.testing.assert_allclose(network(x), native, rtol=1e-4, atol=1e-4)


def test_small_cnn_slices_give_the_unsliced_features_and_gradients(monkeypatch):
    """On the CPU small_cnn runs a large batch as slices (``cpu_slice_pixels``); features and
    gradients equal those of the whole batch in one piece (``features_of``)."""
    network = Network("small_cnn", 3, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (10, 8, 8, 3))
    monkeypatch.setattr(SmallCNN, "cpu_slice_pixels", 3 * 64)  # 4 slices: 3, 3, 3 and 1 images
    whole = network.backbone.features_of(x)
    np.testing.assert_allclose(network.backbone(x), whole, rtol=1e-5, atol=1e-6)

    def grads(features):  # jitted, as training runs it (eagerly each op compiles: 4x slower)
        loss = lambda net: jnp.sum(jnp.sin(net.head(features(net.backbone, x))))  # noqa: E731
        return nnx.jit(nnx.grad(loss))(network)

    sliced, unsliced = grads(lambda b, x: b(x)), grads(lambda b, x: b.features_of(x))
    for a, b in zip(jax.tree.leaves(nnx.state(sliced)), jax.tree.leaves(nnx.state(unsliced))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if jax.default_backend() == "cpu":
        text = jax.jit(lambda x: network.backbone(x)).lower(x).as_text()
        assert text.count("stablehlo.convolution") == 12  # 3 layers x 4 slices


@pytest.mark.parametrize("backbone", ["preact_resnet18", "resnet18"])
def test_batchnorm_backbones_train_and_update_their_statistics(backbone):
    """One train step of a BatchNorm backbone runs and moves its running statistics."""
    from benchmark import training
    from benchmark.config import build_method
    from core.spec import Batch, TaskSpec

    spec = TaskSpec(num_classes=3, num_experts=1, input_shape=(8, 8, 3), backbone=backbone)
    method = build_method("classifier_only", {}, spec)
    model = training.init_model(method, spec, 0)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optim = training.OptimConfig(total_steps=2)
    state = training.TrainState(params, rest, training.make_optimizer(optim).init(params))
    before = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    rng = np.random.default_rng(0)
    batch = Batch(jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32), jnp.asarray([0, 1, 2, 0]),
                  jnp.zeros((4, 1), jnp.int32))
    state, metrics = training.train_step(method, graphdef, optim, state, batch,
                                         training.train_inputs(method, None, 0.0))
    assert np.isfinite(float(metrics["loss"]))
    after = nnx.state(nnx.merge(graphdef, state.params, state.rest), nnx.BatchStat)
    assert any(not np.allclose(a, b) for a, b in zip(before, jax.tree.leaves(after)))


# --- mixed precision ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [None, "fp32", jnp.float32])
def test_float32_or_none_leaves_the_model_as_it_is(dtype):
    network = Network("small_cnn", 3, 4, rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(network)
    assert set_compute_dtype(network, dtype) is network and nnx.graphdef(network) == graphdef


@pytest.mark.parametrize("backbone,size", [("small_cnn", 16), ("preact_resnet18", 8), ("resnet18", 16)])
def test_bf16_backbones_compute_in_bf16_with_float32_parameters_and_logits(backbone, size):
    network = Network(backbone, 3, 5, rngs=nnx.Rngs(0))
    network.eval()
    x = jax.random.normal(jax.random.key(4), (4, size, size, 3))
    reference = network(x)
    graphdef = nnx.graphdef(network)
    set_compute_dtype(network, jnp.bfloat16)
    # the dtype is static: the graphdef changes, so a step jitted on it compiles again
    assert nnx.graphdef(network) != graphdef
    layers = [m for _, m in nnx.iter_modules(network.backbone) if isinstance(m, nets.COMPUTED_IN_DTYPE)]
    assert layers and all(m.dtype == jnp.bfloat16 for m in layers)
    assert network.head.dtype is None  # the head stays float32
    assert network.backbone(x).dtype == jnp.bfloat16
    logits = network(x)
    assert logits.dtype == jnp.float32  # a float32 head fed bfloat16 features promotes
    assert not np.array_equal(logits, reference)
    scale = float(jnp.max(jnp.abs(reference)))
    np.testing.assert_allclose(logits, reference, atol=0.05 * scale + 0.02)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(network, nnx.Param)))


@pytest.mark.parametrize("implementation", ["native", "matmul", "gemm"])
def test_bf16_convolutions_honour_the_compute_dtype(monkeypatch, implementation):
    monkeypatch.setenv("L2D_CONV", implementation)
    conv = Conv(4, 6, (3, 3), strides=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 9, 9, 4))
    reference = conv(x)
    conv.dtype = jnp.bfloat16
    y = conv(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), reference, atol=0.05, rtol=0.02)
    grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(conv)
    assert grads.kernel[...].dtype == jnp.float32  # gradients of the float32 master weights
    reference_grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(Conv(4, 6, (3, 3), strides=2, rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(grads.kernel[...], reference_grads.kernel[...],
                               atol=0.05 * float(jnp.max(jnp.abs(reference_grads.kernel[...]))))


@pytest.mark.parametrize("name,backbone", [("classifier_only", "preact_resnet18"), ("prob_l2d", "small_cnn")])
def test_bf16_method_model_trains_with_float32_state_and_logits(name, backbone):
    """A method's model in bf16: a train step runs, parameters, optimiser state and
    BatchNorm running statistics stay float32 (the statistics move), logits are float32."""
    from benchmark import training
    from benchmark.config import build_method
    from core.spec import Batch, TaskSpec, WorkloadBounds

    spec = TaskSpec(num_classes=3, num_experts=2, input_shape=(8, 8, 3), backbone=backbone)
    method = build_method(name, {}, spec)
    model = set_compute_dtype(training.init_model(method, spec, 0), jnp.bfloat16)
    backbones = tuple(BACKBONES.get(n) for n in BACKBONES.names())
    assert any(isinstance(m, backbones) for _, m in nnx.iter_modules(model))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optim = training.OptimConfig(total_steps=2)
    state = training.TrainState(params, rest, training.make_optimizer(optim).init(params))
    rng = np.random.default_rng(0)
    batch = Batch(jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8)),
                  jnp.asarray(rng.integers(-1, 3, (8, 2)), jnp.int32))
    inputs = training.train_inputs(method, WorkloadBounds((0.0,) * 3, (1.0,) * 3), 0.5)
    stats_before = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    for _ in range(2):
        state, metrics = training.train_step(method, graphdef, optim, state, batch, inputs)
    assert np.isfinite(float(metrics["loss"]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state)
               if jnp.issubdtype(leaf.dtype, jnp.floating))
    trained = nnx.merge(graphdef, state.params, state.rest)
    stats_after = jax.tree.leaves(nnx.state(trained, nnx.BatchStat))
    assert all(leaf.dtype == jnp.float32 for leaf in stats_after)
    if stats_before:
        assert any(not np.allclose(a, b) for a, b in zip(stats_before, stats_after))
    trained.eval()
    assert method.classify(trained, batch.x).dtype == jnp.float32
