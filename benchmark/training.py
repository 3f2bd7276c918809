"""The one training loop shared by every method: pure jitted steps, host-side loop.

A method's NNX model is split into ``(graphdef, params, rest)``; the jitted step merges
it, takes the gradient of ``method.loss``, applies an optax update and returns the new
state with scalar metrics. ``method``, ``graphdef`` and ``OptimConfig`` are hashable
static arguments, so each (method config, shape) compiles once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmark.config import TrainConfig
from core.files import atomic_write_bytes, read_cache
from core.spec import Batch, Method, TaskSpec, TrainInputs, WorkloadBounds


def use_compilation_cache(path: Path | None) -> None:
    """Keep compiled programs under ``path`` (JAX's persistent cache), so that other
    processes (later runs, parallel launchers' jobs, tests) load them instead of compiling
    again; None leaves the setting as it is."""
    if path is not None and jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum, decoupled-from-bias weight decay and a cosine schedule (hashable:
    a static argument of the jitted step). Defaults: ``benchmark.config.TrainConfig``'s."""

    learning_rate: float = TrainConfig.learning_rate
    momentum: float = TrainConfig.momentum
    weight_decay: float = TrainConfig.weight_decay
    total_steps: int = 1000
    warmup_steps: int = 0

    @classmethod
    def for_training(cls, train: TrainConfig, total_steps: int) -> "OptimConfig":
        """The optimiser of the ``train.*`` settings over ``total_steps`` steps."""
        return cls(learning_rate=train.learning_rate, momentum=train.momentum,
                   weight_decay=train.weight_decay, total_steps=total_steps)


def _decay_mask(params):
    """Weight decay on kernels only (biases, norms and scales are excluded)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "kernel" in str(path[-2] if len(path) > 1 else path[-1]), params
    )


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation described by ``config``."""
    if config.warmup_steps:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=config.learning_rate,
            warmup_steps=config.warmup_steps,
            decay_steps=max(config.total_steps, config.warmup_steps + 1),
        )
    else:
        schedule = optax.cosine_decay_schedule(config.learning_rate, max(config.total_steps, 1))
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
        optax.sgd(schedule, momentum=config.momentum),
    )


@dataclasses.dataclass
class TrainState:
    """Arrays of one model under training (a pytree of params, other state, optimiser)."""

    params: Any
    rest: Any
    opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "rest", "opt_state"], meta_fields=[])


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def train_step(
    method: Method, graphdef: Any, optim: OptimConfig, state: TrainState, batch: Batch,
    inputs: TrainInputs,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on ``method.loss``; returns the new state and scalar metrics."""

    def loss_fn(params):  # a fresh copy: BatchNorm updates its statistics inside this trace
        model = nnx.merge(graphdef, params, state.rest, copy=True)
        loss, metrics = method.loss(model, batch, inputs)
        return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (metrics, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = make_optimizer(optim).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, rest, opt_state), {"loss": loss, **metrics}


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def train_step_seeds(
    method: Method, graphdef: Any, optim: OptimConfig, state: TrainState, batch: Batch,
    inputs: TrainInputs,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``train_step`` of S seeds as one program (``vmap``): ``state``, ``batch`` and the
    returned metrics carry a leading seed axis; ``inputs`` (progress, bounds) are shared."""
    step = functools.partial(train_step.__wrapped__, method, graphdef, optim)
    return jax.vmap(step, in_axes=(0, 0, None))(state, batch, inputs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def predict(method: Method, graphdef: Any, params: Any, rest: Any, x: jax.Array):
    """(logits (B, K), class probabilities (B, K), agent scores (B, E+1)) in evaluation mode."""
    model = nnx.merge(graphdef, params, rest)
    return method.classify(model, x), method.class_probabilities(model, x), method.agent_scores(model, x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def impute_step(method: Method, graphdef: Any, params: Any, rest: Any, batch: Batch,
                inputs: TrainInputs):
    """(B, E, K) inferred expert-label distribution, or None if the method has none."""
    model = nnx.merge(graphdef, params, rest)
    return method.impute(model, batch, inputs)


@dataclasses.dataclass
class TrainedModel:
    """A trained model in evaluation mode plus what training measured."""

    method: Method
    graphdef: Any  # evaluation-mode graph
    params: Any
    rest: Any
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    samples_seen: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    num_devices: int = 1  # devices the training batches were sharded over
    seeds_in_program: int = 1  # seeds trained together in one vmapped program

    def predict(self, x: np.ndarray, batch_size: int = 1024) -> dict[str, np.ndarray]:
        """``logits``, class ``probs`` and agent ``scores`` for every row of ``x``, batched."""
        parts: dict[str, list[np.ndarray]] = {"logits": [], "probs": [], "scores": []}
        for start in range(0, len(x), batch_size):
            chunk = jnp.asarray(x[start : start + batch_size])
            out = predict(self.method, self.graphdef, self.params, self.rest, chunk)
            for name, value in zip(parts, out):
                parts[name].append(np.asarray(value))
        return {name: np.concatenate(values) for name, values in parts.items()}

    def diagnostics(self, batch: Batch, bounds: WorkloadBounds) -> dict[str, float]:
        """The method's extra run metrics (``Method.diagnostics``) on one batch."""
        model = nnx.merge(self.graphdef, self.params, self.rest)
        batch = Batch(*(jnp.asarray(a) for a in batch))
        return self.method.diagnostics(model, batch, train_inputs(self.method, bounds, 1.0))

    def impute(self, batches: list[Batch], bounds: WorkloadBounds) -> np.ndarray | None:
        """Inferred (N, E, K) expert-label distributions over ``batches`` (None if unmodelled)."""
        inputs = train_inputs(self.method, bounds, 1.0)
        out = []
        for batch in batches:
            batch = Batch(*(jnp.asarray(a) for a in batch))
            q_t = impute_step(self.method, self.graphdef, self.params, self.rest, batch, inputs)
            if q_t is None:
                return None
            out.append(np.asarray(q_t))
        return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Data-parallel training over the local devices: each batch is split along its first
    axis across a 1-D mesh, parameters and optimiser state are replicated, and ``jit``
    inserts the gradient all-reduce. One device (or a batch that does not split evenly)
    leaves everything as it is."""

    mesh: Mesh | None

    batch_axis: int = 0  # 1 when batches carry a leading seed axis

    @classmethod
    def over_local_devices(cls, batch_size: int, batch_axis: int = 0) -> "DataParallel":
        devices = jax.local_devices()
        if len(devices) < 2 or batch_size % len(devices):
            return cls(None)
        return cls(Mesh(np.asarray(devices), ("data",)), batch_axis)

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def replicate(self, tree: Any) -> Any:
        return tree if self.mesh is None else jax.device_put(tree, NamedSharding(self.mesh, P()))

    def put(self, batch: Batch) -> Batch:
        """Host arrays of a batch for the step: split along ``batch_axis`` over the mesh;
        on one device as they are (``jit`` transfers numpy arguments faster than ``device_put``)."""
        if self.mesh is None:
            return batch
        spec = P(*([None] * self.batch_axis), "data")
        return jax.device_put(batch, NamedSharding(self.mesh, spec))


TRAINED = nnx.Any(nnx.Param, nnx.BatchStat)  # what training changes (shared between methods)


def save_trained(trained: "TrainedModel", path: Path) -> None:
    """Write what training produced (parameters, batch statistics, timings, the metrics of
    every epoch) to ``path``."""
    model = nnx.merge(trained.graphdef, trained.params, trained.rest)
    leaves = jax.tree.leaves(nnx.state(model, TRAINED))
    meta = {"train_seconds": trained.train_seconds, "compile_seconds": trained.compile_seconds,
            "samples_seen": trained.samples_seen, "num_devices": trained.num_devices,
            "seeds_in_program": trained.seeds_in_program, "history": trained.history}
    buffer = io.BytesIO()
    np.savez(buffer, meta=json.dumps(meta), **{f"leaf_{i}": np.asarray(v) for i, v in enumerate(leaves)})
    atomic_write_bytes(path, buffer.getvalue())


def restore_trained(method: Method, model: Any, path: Path) -> "TrainedModel | None":
    """``model`` (initialised and prepared) with the trained state saved at ``path``, in
    evaluation mode; None when there is no such file, it does not match the model's
    structure, or it is corrupt (then it is named, deleted and trained again)."""
    state = nnx.state(model, TRAINED)
    treedef = jax.tree.structure(state)

    def read(saved):
        if len([k for k in saved.files if k.startswith("leaf_")]) != treedef.num_leaves:
            return None
        return ([jnp.asarray(saved[f"leaf_{i}"]) for i in range(treedef.num_leaves)],
                json.loads(str(saved["meta"])))

    found = read_cache(path, read, "trained model")
    if found is None:
        return None
    leaves, meta = found
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return TrainedModel(method, graphdef, params, rest, meta["train_seconds"], meta["compile_seconds"],
                        meta["samples_seen"], num_devices=meta["num_devices"],
                        seeds_in_program=meta.get("seeds_in_program", 1),
                        history=meta.get("history", []))


def train_inputs(method: Method, bounds: WorkloadBounds | None, progress: float) -> TrainInputs:
    """The ``TrainInputs`` of one step; bounds only for methods that declare they use them."""
    if method.workload_in_training and bounds is not None:
        return TrainInputs(jnp.float32(progress), jnp.asarray(bounds.lo, jnp.float32),
                           jnp.asarray(bounds.hi, jnp.float32))
    return TrainInputs(jnp.float32(progress))


def init_model(method: Method, spec: TaskSpec, seed: int):
    """Build the method's model from ``seed``; returns the NNX model."""
    return method.init_model(spec, nnx.Rngs(params=seed, default=seed))


def fit(
    method: Method,
    models: list[Any],
    epoch_batches: list[Callable[[int], Iterator[Batch]]],
    *,
    epochs: int,
    optim: OptimConfig,
    bounds: WorkloadBounds | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> list[TrainedModel]:
    """Train ``models`` (one per seed) for ``epochs``; ``epoch_batches[i](e)`` yields seed
    i's batches of epoch e (each seed its own order, augmentation and labels).

    One model trains with ``train_step``; several train as one program
    (``train_step_seeds``), their arrays stacked on a leading seed axis. Each step gets
    ``TrainInputs``: the fraction of training done and, if the method declares
    ``workload_in_training``, the workload ``bounds``. The first step, which compiles, is
    timed apart as ``compile_seconds``; a program's times are shared equally by its seeds.
    """
    seeds = len(models)
    for model in models:
        model.train()
    splits = [nnx.split(model, nnx.Param, ...) for model in models]
    graphdef = splits[0][0]
    states = [TrainState(params, rest, make_optimizer(optim).init(params)) for _, params, rest in splits]
    state = states[0] if seeds == 1 else jax.tree.map(lambda *a: jnp.stack(a), *states)
    step_fn, batch_axis = (train_step, 0) if seeds == 1 else (train_step_seeds, 1)
    fixed = train_inputs(method, bounds, 0.0)  # the bounds, put on the device once
    total_steps = max(optim.total_steps, 1)
    step, seen, train_seconds, compile_seconds = 0, 0, 0.0, 0.0
    history: list[list[dict[str, float]]] = [[] for _ in range(seeds)]
    parallel: DataParallel | None = None
    for epoch in range(epochs):
        epoch_metrics: list[dict[str, jax.Array]] = []
        start = time.perf_counter()
        for parts in zip(*(batches(epoch) for batches in epoch_batches), strict=True):
            batch = parts[0] if seeds == 1 else Batch(*(np.stack(a) for a in zip(*parts)))
            if parallel is None:  # decided on the first batch: its size must split evenly
                parallel = DataParallel.over_local_devices(batch.y.shape[batch_axis], batch_axis)
                state = parallel.replicate(state)
            inputs = TrainInputs(np.float32(step / total_steps), fixed.lo, fixed.hi)
            state, metrics = step_fn(method, graphdef, optim, state, parallel.put(batch), inputs)
            if step == 0:
                jax.block_until_ready(state.params)
                compile_seconds = time.perf_counter() - start
                start = time.perf_counter()
            epoch_metrics.append(metrics)
            step += 1
            seen += int(batch.y.shape[batch_axis])
        epoch_metrics = jax.device_get(epoch_metrics)  # waits for the epoch's steps
        train_seconds += time.perf_counter() - start
        for i in range(seeds):
            means = {k: float(np.mean([np.reshape(m[k], -1)[i] for m in epoch_metrics]))
                     for k in epoch_metrics[0]}
            if not all(np.isfinite(v) for v in means.values()):
                raise FloatingPointError(
                    f"{method.name}: non-finite training metrics at epoch {epoch}"
                    f"{f' (seed {i + 1} of {seeds} in the program)' if seeds > 1 else ''}: {means}"
                )
            history[i].append(means)
        if progress is not None:
            progress(epoch, history[0][-1])
    state = jax.device_put(state, jax.devices()[0])  # evaluation runs on one device
    trained = []
    for i in range(seeds):
        own = state if seeds == 1 else jax.tree.map(lambda a: a[i], state)
        model = nnx.merge(graphdef, own.params, own.rest)
        model.eval()
        eval_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        trained.append(TrainedModel(
            method, eval_graphdef, params, rest, train_seconds / seeds, compile_seconds / seeds,
            seen, history[i], num_devices=parallel.num_devices if parallel is not None else 1,
            seeds_in_program=seeds,
        ))
    return trained
