"""Train-step throughput (images/s) per method, backbone, image size and convolution.

Each row trains ``STEPS`` optimiser steps of one method on random data of batch ``BATCH``
(one jitted step, compiled outside the timing, ``block_until_ready`` before reading the
clock; median of ``REPEATS`` runs). ``native`` is XLA's convolution (the default),
``matmul`` the slices + matmul formulation (``methods.nets.conv_as_matmul``).

    PYTHONPATH=. .venv/bin/python tests/benchmarks/train_step_table.py [--methods all]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmark import training
from benchmark.config import build_method
from benchmark.spec import Batch, TaskSpec, WorkloadBounds

BATCH, STEPS, REPEATS = 128, 5, 3
NUM_CLASSES, NUM_EXPERTS = 10, 3


def make_step():
    """A fresh jitted train step (its own compilation cache: L2D_CONV is read at trace time)."""
    return jax.jit(training.train_step.__wrapped__, static_argnums=(0, 1, 2))


def step_seconds(method_name: str, backbone: str, size: int, conv: str, batch: int = BATCH,
                 steps: int = STEPS, repeats: int = REPEATS) -> float:
    """Median seconds of one train step (compile excluded)."""
    previous = os.environ.get("L2D_CONV")
    os.environ["L2D_CONV"] = conv
    try:
        return _step_seconds(method_name, backbone, size, batch, steps, repeats)
    finally:
        if previous is None:
            os.environ.pop("L2D_CONV", None)
        else:
            os.environ["L2D_CONV"] = previous


def _step_seconds(method_name: str, backbone: str, size: int, batch: int, steps: int,
                  repeats: int) -> float:
    spec = TaskSpec(NUM_CLASSES, NUM_EXPERTS, (size, size, 3), backbone)
    method = build_method({"name": method_name, "params": {}}, spec)
    model = training.init_model(method, spec, 0)
    model.train()
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optim = training.OptimConfig(total_steps=100)
    state = training.TrainState(params, rest, training.make_optimizer(optim).init(params))
    rng = np.random.default_rng(0)
    data = Batch(jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32),
                 jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32),
                 jnp.asarray(rng.integers(-1, NUM_CLASSES, (batch, NUM_EXPERTS)), jnp.int32))
    bounds = WorkloadBounds((0.0,) * 4, (1.0,) * 3 + (0.5,))
    inputs = training.train_inputs(method, bounds, 0.5)
    step = make_step()
    state, _ = step(method, graphdef, optim, state, data, inputs)  # compile
    jax.block_until_ready(state.params)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, _ = step(method, graphdef, optim, state, data, inputs)
        jax.block_until_ready(state.params)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main() -> None:
    from methods import METHODS, load_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="classifier_only,prob_l2d",
                        help="comma-separated method names, or 'all'")
    parser.add_argument("--backbones", default="small_cnn")
    parser.add_argument("--sizes", default="16,32")
    args = parser.parse_args()
    load_all()
    names = METHODS.names() if args.methods == "all" else args.methods.split(",")
    names = [n for n in names if METHODS.get(n).trains]
    print(f"backend: {jax.default_backend()}, device: {jax.devices()[0].device_kind}, "
          f"batch {BATCH}, median of {REPEATS} x {STEPS} steps")
    print("| method | backbone | size | conv | ms/step | images/s |")
    print("|---|---|---:|---|---:|---:|")
    for name in names:
        for backbone in args.backbones.split(","):
            for size in map(int, args.sizes.split(",")):
                for conv in ("native", "matmul"):
                    seconds = step_seconds(name, backbone, size, conv)
                    print(f"| {name} | {backbone} | {size} | {conv} | {1000 * seconds:.1f} | "
                          f"{BATCH / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
