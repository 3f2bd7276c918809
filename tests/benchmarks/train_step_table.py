"""Train-step throughput (images/s) per method, backbone, image size and convolution.

Each row trains ``STEPS`` optimiser steps of one method on random data of batch ``BATCH``
(one jitted step, compiled outside the timing, ``block_until_ready`` before reading the
clock; median of ``REPEATS`` runs). ``native`` is XLA's convolution (the default),
``matmul`` the slices + matmul formulation (``methods.nets.conv_as_matmul``); 3 seeds in
one program is ``training.train_step_seeds`` (images/s counts every seed's images).

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
from core.spec import Batch, TaskSpec, WorkloadBounds

BATCH, STEPS, REPEATS = 128, 5, 3
NUM_CLASSES, NUM_EXPERTS = 10, 3


def make_step(seeds: int = 1):
    """A fresh jitted train step (its own compilation cache: L2D_CONV is read at trace time);
    with ``seeds`` > 1 the step of that many seeds as one vmapped program."""
    step = training.train_step if seeds == 1 else training.train_step_seeds
    return jax.jit(step.__wrapped__, static_argnums=(0, 1, 2))


def prepared_steps(method_name: str, backbone: str, size: int, conv: str, batch: int = BATCH,
                   steps: int = STEPS, seeds: int = 1):
    """A compiled train step on random data; returns ``run()``, which takes ``steps`` steps,
    waits for them and returns the last step's loss (one per seed when ``seeds`` > 1: that
    many seeds trained as one program)."""
    previous = os.environ.get("L2D_CONV")
    os.environ["L2D_CONV"] = conv
    try:
        return _prepared_steps(method_name, backbone, size, batch, steps, seeds)
    finally:
        if previous is None:
            os.environ.pop("L2D_CONV", None)
        else:
            os.environ["L2D_CONV"] = previous


def _prepared_steps(method_name: str, backbone: str, size: int, batch: int, steps: int, seeds: int):
    from flax import nnx

    spec = TaskSpec(NUM_CLASSES, NUM_EXPERTS, (size, size, 3), backbone)
    method = build_method(method_name, {}, spec)
    optim = training.OptimConfig(total_steps=100)
    rng = np.random.default_rng(0)
    states, batches = [], []
    for seed in range(seeds):
        model = training.init_model(method, spec, seed)
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        states.append(training.TrainState(params, rest, training.make_optimizer(optim).init(params)))
        batches.append(Batch(rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                             rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
                             rng.integers(-1, NUM_CLASSES, (batch, NUM_EXPERTS)).astype(np.int32)))
    stack = (lambda *a: a[0]) if seeds == 1 else (lambda *a: jnp.stack(a))
    state = jax.tree.map(stack, *states)
    data = Batch(*(stack(*map(jnp.asarray, a)) for a in zip(*batches)))
    bounds = WorkloadBounds((0.0,) * 4, (1.0,) * 3 + (0.5,))
    inputs = training.train_inputs(method, bounds, 0.5)
    step = make_step(seeds)
    current = {"state": step(method, graphdef, optim, state, data, inputs)[0]}  # compile
    jax.block_until_ready(current["state"].params)

    def run() -> np.ndarray:
        state, metrics = current["state"], None
        for _ in range(steps):
            state, metrics = step(method, graphdef, optim, state, data, inputs)
        current["state"] = jax.block_until_ready(state)
        return np.asarray(metrics["loss"])

    return run


def step_seconds(method_name: str, backbone: str, size: int, conv: str, batch: int = BATCH,
                 steps: int = STEPS, repeats: int = REPEATS, seeds: int = 1) -> float:
    """Median seconds of one train step (compile excluded); ``seeds`` > 1 times one step of
    that many seeds trained together."""
    run = prepared_steps(method_name, backbone, size, conv, batch, steps, seeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main(argv=None) -> None:
    from methods import METHODS, load_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="classifier_only,prob_l2d",
                        help="comma-separated method names, or 'all'")
    parser.add_argument("--backbones", default="small_cnn")
    parser.add_argument("--sizes", default="16,32")
    args = parser.parse_args(argv)
    load_all()
    names = METHODS.names() if args.methods == "all" else args.methods.split(",")
    names = [n for n in names if METHODS.get(n).trains]
    print(f"backend: {jax.default_backend()}, device: {jax.devices()[0].device_kind}, "
          f"batch {BATCH}, median of {REPEATS} x {STEPS} steps")
    print("| method | backbone | size | conv | seeds in one program | ms/step | images/s |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name in names:
        for backbone in args.backbones.split(","):
            for size in map(int, args.sizes.split(",")):
                for conv, seeds in (("native", 1), ("matmul", 1), ("native", 3)):
                    seconds = step_seconds(name, backbone, size, conv, seeds=seeds)
                    print(f"| {name} | {backbone} | {size} | {conv} | {seeds} | {1000 * seconds:.1f} | "
                          f"{seeds * BATCH / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
