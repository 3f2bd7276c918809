"""The matmul convolution (``L2D_CONV=matmul``) equals XLA's native one, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from methods.nets import Conv, Network, conv_implementation


@pytest.mark.parametrize("kernel,stride,size,bias", [
    ((3, 3), 1, 8, True), ((3, 3), 2, 9, False), ((3, 3), 2, 8, False),
    ((1, 1), 2, 7, False), ((7, 7), 2, 16, False),
])
def test_matmul_convolution_equals_the_native_one(monkeypatch, kernel, stride, size, bias):
    conv = Conv(3, 5, kernel, strides=stride, use_bias=bias, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))

    def outputs_and_grads(implementation):
        monkeypatch.setenv("L2D_CONV", implementation)
        assert conv_implementation() == implementation

        def loss(model, x):
            return jnp.sum(jnp.sin(model(x)))

        value, (grad_model, grad_x) = jax.value_and_grad(
            lambda m, x: loss(m, x), argnums=(0, 1))(conv, x)
        return conv(x), grad_model, grad_x

    native, matmul = outputs_and_grads("native"), outputs_and_grads("matmul")
    np.testing.assert_allclose(matmul[0], native[0], rtol=1e-5, atol=1e-5)
    assert matmul[0].shape == native[0].shape
    np.testing.assert_allclose(matmul[2], native[2], rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(nnx.state(matmul[1])), jax.tree.leaves(nnx.state(native[1]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_auto_uses_the_native_convolution_and_the_override_is_checked(monkeypatch):
    monkeypatch.delenv("L2D_CONV", raising=False)
    assert conv_implementation() == "native"  # measured at least as fast (train-step benchmark)
    monkeypatch.setenv("L2D_CONV", "fast")
    with pytest.raises(ValueError, match="L2D_CONV='fast' is not one of auto, native, matmul"):
        conv_implementation()


@pytest.mark.parametrize("backbone,size", [("small_cnn", 16), ("preact_resnet18", 8)])
def test_backbones_agree_across_implementations(monkeypatch, backbone, size):
    network = Network(backbone, 3, 4, rngs=nnx.Rngs(0))
    network.eval()
    x = jax.random.normal(jax.random.key(2), (2, size, size, 3))
    monkeypatch.setenv("L2D_CONV", "native")
    native = network(x)
    monkeypatch.setenv("L2D_CONV", "matmul")
    np.testing.assert_allclose(network(x), native, rtol=1e-4, atol=1e-4)


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
