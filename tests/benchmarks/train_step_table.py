"""Train-step throughput (images/s) per method, backbone, image size, convolution and precision.

Each row trains ``STEPS`` optimiser steps of one method on random data of batch ``BATCH``
(one jitted step, compiled outside the timing, ``block_until_ready`` before reading the
clock; median of ``REPEATS`` runs). Convolutions (``methods.nets.conv_implementation``):
``native`` is XLA's, ``matmul`` slices + one matmul (``conv_as_matmul``), ``gemm`` im2col
GEMMs for the forward pass and both gradients (``conv_gemm``), ``auto`` the harness's
default (per convolution shape: native on accelerators, the faster of native and gemm on
the CPU). Precision ``bf16``: the backbones compute in bfloat16 (``set_compute_dtype``),
parameters stay float32. 3 seeds in one program is ``training.train_step_seeds``
(images/s counts every seed's images).

    PYTHONPATH=. .venv/bin/python tests/benchmarks/train_step_table.py [--methods all]
        [--convs native,matmul,gemm,auto] [--precisions fp32,bf16] [--seeds 1,3]
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
PRECISIONS = {"fp32": None, "bf16": jnp.bfloat16}


def make_step(seeds: int = 1):
    """A fresh jitted train step: a new function object, so a trace of its own (jit keeps
    traces per function, and ``L2D_CONV`` is read while tracing: re-jitting the same
    function would reuse the first convolution's program); with ``seeds`` > 1 the step of
    that many seeds as one vmapped program."""
    step = (training.train_step if seeds == 1 else training.train_step_seeds).__wrapped__

    def fresh(*args):
        return step(*args)

    return jax.jit(fresh, static_argnums=(0, 1, 2))


def prepared_steps(method_name: str, backbone: str, size: int, conv: str, batch: int = BATCH,
                   steps: int = STEPS, seeds: int = 1, precision: str = "fp32"):
    """A compiled train step on random data; returns ``run()``, which takes ``steps`` steps,
    waits for them and returns the last step's loss (one per seed when ``seeds`` > 1: that
    many seeds trained as one program)."""
    previous = os.environ.get("L2D_CONV")
    os.environ["L2D_CONV"] = conv
    try:
        return _prepared_steps(method_name, backbone, size, batch, steps, seeds, precision)
    finally:
        if previous is None:
            os.environ.pop("L2D_CONV", None)
        else:
            os.environ["L2D_CONV"] = previous


def _prepared_steps(method_name: str, backbone: str, size: int, batch: int, steps: int, seeds: int,
                    precision: str):
    from flax import nnx

    from methods.nets import set_compute_dtype

    spec = TaskSpec(NUM_CLASSES, NUM_EXPERTS, (size, size, 3), backbone)
    method = build_method(method_name, {}, spec)
    optim = training.OptimConfig(total_steps=100)
    rng = np.random.default_rng(0)
    states, batches = [], []
    for seed in range(seeds):
        model = set_compute_dtype(training.init_model(method, spec, seed), PRECISIONS[precision])
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
                 steps: int = STEPS, repeats: int = REPEATS, seeds: int = 1,
                 precision: str = "fp32") -> float:
    """Median seconds of one train step (compile excluded); ``seeds`` > 1 times one step of
    that many seeds trained together."""
    run = prepared_steps(method_name, backbone, size, conv, batch, steps, seeds, precision)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def interleaved_seconds(runs: dict, steps: int = STEPS, rounds: int = 7) -> dict:
    """Seconds of one step of each prepared run (``prepared_steps``), the runs taking turns
    for ``rounds`` rounds, best round each: a ratio of two of them is measured under the
    same machine load (other processes on a shared CPU slow both alike)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def main(argv=None) -> None:
    from methods import METHODS, load_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="classifier_only,prob_l2d",
                        help="comma-separated method names, or 'all'")
    parser.add_argument("--backbones", default="small_cnn")
    parser.add_argument("--sizes", default="16,32")
    parser.add_argument("--convs", default="native,matmul,gemm,auto",
                        help="convolutions (methods.nets.CONV_IMPLEMENTATIONS)")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--seeds", default="1,3",
                        help="seeds in one program; more than 1 is timed with the auto convolution")
    args = parser.parse_args(argv)
    load_all()
    names = METHODS.names() if args.methods == "all" else args.methods.split(",")
    names = [n for n in names if METHODS.get(n).trains]
    precisions = args.precisions.split(",")
    for precision in precisions:
        if precision not in PRECISIONS:
            parser.error(f"--precisions: {precision!r} is not one of {', '.join(PRECISIONS)}")
    cases = [(conv, 1) for conv in args.convs.split(",")]
    cases += [("auto", int(s)) for s in args.seeds.split(",") if int(s) > 1]
    print(f"backend: {jax.default_backend()}, device: {jax.devices()[0].device_kind}, "
          f"batch {BATCH}, median of {REPEATS} x {STEPS} steps")
    print("| method | backbone | size | precision | conv | seeds in one program | ms/step | images/s |")
    print("|---|---|---:|---|---|---:|---:|---:|")
    for name in names:
        for backbone in args.backbones.split(","):
            for size in map(int, args.sizes.split(",")):
                for precision in precisions:
                    for conv, seeds in cases:
                        seconds = step_seconds(name, backbone, size, conv, seeds=seeds, precision=precision)
                        print(f"| {name} | {backbone} | {size} | {precision} | {conv} | {seeds} | "
                              f"{1000 * seconds:.1f} | {seeds * BATCH / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
