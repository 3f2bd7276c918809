"""Mixed precision (``train.precision=bf16``): trained on digits, results stay within
tolerance of float32 training."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from benchmark import training
from benchmark.config import build_method
from core.spec import TaskSpec, WorkloadBounds
from datasets.source import ArraySplit, Augment, LoaderConfig

SPEC = TaskSpec(num_classes=10, num_experts=3, input_shape=(8, 8, 1), backbone="small_cnn")
LOADER = LoaderConfig(64, (0.5,), (0.5,), Augment(noise_std=0.1), drop_remainder=True)
EPOCHS = 8


def digits_splits():
    """scikit-learn's digits as uint8 8x8 images: 1,200 to train, the rest to test; three
    experts, each right on its own classes and noisy elsewhere, a third of labels missing."""
    digits = load_digits()
    images = np.round(digits.images / 16 * 255).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int32)
    rng = np.random.default_rng(0)
    own = (np.arange(3)[None, :] == (y[:, None] % 3))
    right = rng.random((len(y), 3)) < np.where(own, 0.95, 0.3)
    t = np.where(right, y[:, None], rng.integers(0, 10, (len(y), 3))).astype(np.int32)
    t = np.where(rng.random(t.shape) < 0.3, -1, t).astype(np.int32)
    return ArraySplit(images[:1200], y[:1200], t[:1200]), images[1200:], y[1200:]


@pytest.mark.parametrize("name", ["classifier_only", "prob_l2d"])
def test_bf16_training_stays_close_to_fp32_on_digits(name):
    train, test_images, test_y = digits_splits()
    x = (test_images.astype(np.float32) / 255 - 0.5) / 0.5
    method = build_method(name, {}, SPEC)
    optim = training.OptimConfig(learning_rate=0.05, total_steps=EPOCHS * (len(train) // 64))
    bounds = WorkloadBounds((0.0,) * 4, (1.0,) * 4)
    outputs = {}
    for precision in ("fp32", "bf16"):
        model = training.init_model(method, SPEC, 0, precision)
        (trained,) = training.fit(method, [model], training.DeviceEpochs((train,), LOADER, (0,)),
                                  epochs=EPOCHS, optim=optim, bounds=bounds)
        params = nnx.merge(trained.graphdef, trained.params, trained.rest)
        master_weights = jax.tree.leaves(nnx.state(params, nnx.Param))
        assert all(leaf.dtype == np.float32 for leaf in master_weights)
        outputs[precision] = trained.predict(x)
        assert outputs[precision]["logits"].dtype == np.float32
    accuracy = {p: float(np.mean(out["logits"].argmax(1) == test_y)) for p, out in outputs.items()}
    assert accuracy["fp32"] > 0.85 and abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.03, accuracy
    routes = {p: out["scores"].argmax(1) for p, out in outputs.items()}
    assert np.mean(routes["bf16"] == routes["fp32"]) >= 0.85  # the same agent for most samples
    # bf16 really computed in bfloat16: the outputs are not float32-identical
    assert not np.allclose(outputs["bf16"]["logits"], outputs["fp32"]["logits"], atol=1e-4)
