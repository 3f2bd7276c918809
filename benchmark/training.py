"""The one training loop shared by every method: pure jitted steps and epochs.

A method's NNX model is split into ``(graphdef, params, rest)``; the jitted step merges
it, takes the gradient of ``method.loss``, applies an optax update and returns the new
state with scalar metrics. In-memory data trains an epoch per dispatch (``train_epoch``:
the split on the device, batches and augmentation built there, ``lax.scan`` over the
steps); streamed data dispatches one step per host batch. ``method``, ``graphdef``,
``OptimConfig`` and ``LoaderConfig`` are hashable static arguments, so each (method
config, shape) compiles once per process.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import operator
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmark.config import PRECISIONS, TrainConfig
from core.compile import jit
from core.files import read_cache, write_cache
from core.spec import Batch, Method, TaskSpec, TrainInputs, WorkloadBounds
from datasets.device import DeviceSplit, device_batch, epoch_rows, put_split
from datasets.source import ArraySplit, LoaderConfig
from methods.nets import set_compute_dtype


def use_compilation_cache(path: Path | None) -> None:
    """Keep compiled programs under ``path`` (JAX's persistent cache), so that other
    processes (later runs, parallel launchers' jobs, tests) load them instead of compiling
    again; None leaves the setting as it is. Entries cut short earlier are removed first."""
    if path is not None and jax.config.values["jax_compilation_cache_dir"] != str(path):
        removed = remove_truncated_entries(Path(path))
        if removed:
            print(f"[l2d-bench] removed {len(removed)} truncated entries of the JAX compilation "
                  f"cache {path} (cut short by a full disk or a kill); they compile again.",
                  file=sys.stderr, flush=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def remove_truncated_entries(path: Path, settled_seconds: float = 60.0) -> list[Path]:
    """Delete the compilation-cache entries under ``path`` that JAX cannot decompress. JAX
    writes an entry in place and never rewrites an existing one, so an entry cut short by a
    full disk or a kill would warn on every later run. Entries modified in the last
    ``settled_seconds`` may still be being written by another process and are left alone."""
    from jax._src.compilation_cache import decompress_executable  # how JAX reads an entry

    removed, now = [], time.time()
    for entry in sorted(path.glob("*-cache")):  # jax._src.lru_cache's name of an entry
        try:
            if now - entry.stat().st_mtime < settled_seconds:
                continue
            data = entry.read_bytes()
        except OSError:  # removed meanwhile
            continue
        try:
            decompress_executable(data)
        except Exception:  # noqa: BLE001 (zlib.error, ZstdError...: what JAX would warn about)
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


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


@functools.partial(jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
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


@functools.partial(jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def train_step_seeds(
    method: Method, graphdef: Any, optim: OptimConfig, state: TrainState, batch: Batch,
    inputs: TrainInputs,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``train_step`` of S seeds as one program (``vmap``): ``state``, ``batch`` and the
    returned metrics carry a leading seed axis; ``inputs`` (progress, bounds) are shared."""
    # jax.jit's wrapper keeps the function as __wrapped__; JitWrapped's type omits it
    step = functools.partial(train_step.__wrapped__, method, graphdef, optim)  # type: ignore[attr-defined]
    return jax.vmap(step, in_axes=(0, 0, None))(state, batch, inputs)


@functools.partial(jit, static_argnums=(0, 1))
def predict(method: Method, graphdef: Any, params: Any, rest: Any, x: jax.Array):
    """(logits (B, K), class probabilities (B, K), agent scores (B, E+1)) in evaluation mode."""
    model = nnx.merge(graphdef, params, rest)
    return method.classify(model, x), method.class_probabilities(model, x), method.agent_scores(model, x)


@functools.partial(jit, static_argnums=(0, 1))
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

    @property
    def replicated(self) -> NamedSharding | None:
        """The sharding of arrays every device holds whole (None: the default device)."""
        return None if self.mesh is None else NamedSharding(self.mesh, P())

    def replicate(self, tree: Any) -> Any:
        """``tree`` on the device(s), whole on each."""
        return jax.device_put(tree, self.replicated)

    def constrain(self, batch: Batch) -> Batch:
        """Inside a jitted program: ``batch`` split along ``batch_axis`` over the mesh."""
        if self.mesh is None:
            return batch
        spec = P(*([None] * self.batch_axis), "data")
        return jax.lax.with_sharding_constraint(batch, NamedSharding(self.mesh, spec))

    def put(self, batch: Batch) -> Batch:
        """A host batch copied for the step (asynchronously): split along ``batch_axis`` over
        the mesh; on one accelerator whole; on one CPU device as it is (``jit`` reads numpy
        arguments there faster than ``device_put`` copies them)."""
        if self.mesh is None:
            return batch if jax.default_backend() == "cpu" else jax.device_put(batch)
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
    write_cache(path, meta=json.dumps(meta), **{f"leaf_{i}": np.asarray(v) for i, v in enumerate(leaves)})


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
    graphdef, params, rest = split_params(model)
    return TrainedModel(method, graphdef, params, rest, meta["train_seconds"], meta["compile_seconds"],
                        meta["samples_seen"], num_devices=meta["num_devices"],
                        seeds_in_program=meta.get("seeds_in_program", 1),
                        history=meta.get("history", []))


def split_params(model: Any) -> tuple[nnx.GraphDef[Any], nnx.State, nnx.State]:
    """``(graphdef, params, rest)`` of an NNX model: its ``nnx.Param`` variables and the rest."""
    graphdef, params, *others = nnx.split(model, nnx.Param, ...)
    (rest,) = others  # two filters: two states
    return graphdef, params, rest


def train_inputs(method: Method, bounds: WorkloadBounds | None, progress: float) -> TrainInputs:
    """The ``TrainInputs`` of one step; bounds only for methods that declare they use them."""
    if method.workload_in_training and bounds is not None:
        return TrainInputs(jnp.float32(progress), jnp.asarray(bounds.lo, jnp.float32),
                           jnp.asarray(bounds.hi, jnp.float32))
    return TrainInputs(jnp.float32(progress))


def init_model(method: Method, spec: TaskSpec, seed: int, precision: str = "fp32"):
    """Build the method's model from ``seed``; returns the NNX model. ``precision="bf16"``:
    its backbones compute in bfloat16 (mixed precision: parameters, optimiser state, heads
    and losses stay float32; ``methods.nets.set_compute_dtype``)."""
    model = method.init_model(spec, nnx.Rngs(params=seed, default=seed))
    if PRECISIONS[precision] is not None:
        set_compute_dtype(model, jnp.dtype(PRECISIONS[precision]))
    return model


@dataclasses.dataclass(frozen=True)
class DeviceEpochs:
    """In-memory training data for the on-device loop: each seed's split (decoded images on
    the host), the loader settings and the run seeds that pick each seed's shuffles and
    augmentation draws."""

    splits: tuple[ArraySplit, ...]
    loader: LoaderConfig
    seeds: tuple[int, ...]
    steps_per_dispatch: int | None = None  # None: ``steps_per_dispatch``'s choice


def _epoch_inputs(step: jax.Array, total_steps: int, fixed: TrainInputs) -> TrainInputs:
    return TrainInputs(step.astype(jnp.float32) / max(total_steps, 1), fixed.lo, fixed.hi)


def steps_per_dispatch(requested: int | None, steps_per_epoch: int) -> int:
    """Training steps in one dispatch of ``train_chunk`` (``train.steps_per_dispatch``).

    None (default) picks a whole epoch on accelerators and one step on the CPU, where XLA
    runs convolutions inside a loop body far slower than in a program of their own (digits,
    prob_l2d: a whole epoch per dispatch trains 23x slower, benchmark
    ``test_default_steps_per_dispatch_is_the_faster_choice``) and a dispatch costs little.
    """
    if requested is None:
        requested = 1 if jax.default_backend() == "cpu" else steps_per_epoch
    return max(1, min(requested, steps_per_epoch))


@functools.partial(jit, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(6,))
def train_chunk(
    method: Method, graphdef: Any, optim: OptimConfig, loader: LoaderConfig, parallel: "DataParallel",
    length: int, state: TrainState, step: jax.Array, split: DeviceSplit, rows: jax.Array,
    keys: jax.Array, fixed: TrainInputs,
) -> tuple[TrainState, jax.Array, dict[str, jax.Array]]:
    """``length`` training steps as one program, from step ``step`` (a device counter of the
    steps taken so far): each step builds its batch on the device
    (``datasets.device.device_batch``: gather the epoch's rows ``step % steps_per_epoch``,
    crop, flip, noise from ``fold_in(key, step)``) and takes ``train_step``; several steps
    run as a ``lax.scan``.

    One seed: ``rows`` (steps_per_epoch, B), ``keys`` one key. S seeds (one vmapped
    program): ``state``, ``rows`` (S, steps_per_epoch, B), ``keys`` (S,) and the split's
    ``y``/``t`` carry a leading seed axis; the images too unless they are (N, H, W, C),
    shared by every seed. Returns the new state and step counter and every step's metrics
    ((length,) or (length, S) each).
    """
    seeds = None if rows.ndim == 2 else rows.shape[0]
    steps_per_epoch = rows.shape[-2]
    # jax.jit's wrapper keeps the function as __wrapped__; JitWrapped's type omits it
    take_step = functools.partial(train_step.__wrapped__, method, graphdef, optim)  # type: ignore[attr-defined]

    def make_batch(split, rows, key, step):
        own_rows = jax.lax.dynamic_index_in_dim(rows, step % steps_per_epoch, keepdims=False)
        return device_batch(split, own_rows, jax.random.fold_in(key, step), loader)

    if seeds is not None:
        image_axis = None if split.images.ndim == 4 else 0
        split_axes: tuple[Any, Any, Any] = (image_axis, 0, 0)  # in_axes: a DeviceSplit of axes
        make_batch = jax.vmap(make_batch, in_axes=(DeviceSplit(*split_axes), 0, 0, None))
        take_step = jax.vmap(take_step, in_axes=(0, 0, None))

    def body(carry, _):
        state, step = carry
        batch = parallel.constrain(make_batch(split, rows, keys, step))
        state, metrics = take_step(state, batch, _epoch_inputs(step, optim.total_steps, fixed))
        return (state, step + 1), metrics

    if length == 1:
        (state, step), metrics = body((state, step), None)
        return state, step, jax.tree.map(lambda m: m[None], metrics)
    (state, step), metrics = jax.lax.scan(body, (state, step), None, length=length)
    return state, step, metrics


def fit(
    method: Method,
    models: list[Any],
    data: "list[Callable[[int], Iterator[Batch]]] | DeviceEpochs",
    *,
    epochs: int,
    optim: OptimConfig,
    bounds: WorkloadBounds | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> list[TrainedModel]:
    """Train ``models`` (one per seed) for ``epochs``.

    ``data`` is either ``DeviceEpochs`` (in-memory data: the splits go to the device once,
    each epoch runs as ``train_chunk`` programs of ``steps_per_dispatch`` steps, and its
    metrics are fetched once) or, for streamed
    data, one callable per seed, ``data[i](e)`` yielding seed i's host batches of epoch e
    (each a ``train_step`` dispatch, the next batch copied to the device ahead of it).

    One model trains with ``train_step``; several train as one program (vmapped), their
    arrays stacked on a leading seed axis. Each step gets ``TrainInputs``: the fraction of
    training done and, if the method declares ``workload_in_training``, the workload
    ``bounds``. Compilation is timed apart as ``compile_seconds``; a program's times are
    shared equally by its seeds.
    """
    seeds = len(models)
    for model in models:
        model.train()
    splits = [split_params(model) for model in models]
    graphdef = splits[0][0]
    states = [TrainState(params, rest, make_optimizer(optim).init(params)) for _, params, rest in splits]
    state = states[0] if seeds == 1 else jax.tree.map(lambda *a: jnp.stack(a), *states)
    run = _EpochRunner(method, graphdef, optim, train_inputs(method, bounds, 0.0), seeds)
    run.state = state  # what fit returns when there is no epoch
    epoch_loop = (run.on_device(state, data, epochs) if isinstance(data, DeviceEpochs)
                  else run.from_host(state, data, epochs))
    history: list[list[dict[str, float]]] = [[] for _ in range(seeds)]
    for epoch in range(epochs):
        epoch_metrics = next(epoch_loop)
        for i in range(seeds):
            means = {k: float(np.mean(np.reshape(v, (len(v), -1))[:, i])) for k, v in epoch_metrics.items()}
            if not all(np.isfinite(v) for v in means.values()):
                raise FloatingPointError(
                    f"{method.name}: non-finite training metrics at epoch {epoch}"
                    f"{f' (seed {i + 1} of {seeds} in the program)' if seeds > 1 else ''}: {means}"
                )
            history[i].append(means)
        if progress is not None:
            progress(epoch, history[0][-1])
    state = jax.device_put(run.state, jax.devices()[0])  # evaluation runs on one device
    trained = []
    for i in range(seeds):
        own = state if seeds == 1 else jax.tree.map(operator.itemgetter(i), state)
        model = nnx.merge(graphdef, own.params, own.rest)
        model.eval()
        eval_graphdef, params, rest = split_params(model)
        trained.append(TrainedModel(
            method, eval_graphdef, params, rest, run.train_seconds / seeds,
            run.compile_seconds / seeds, run.seen, history[i], num_devices=run.num_devices,
            seeds_in_program=seeds,
        ))
    return trained


class _EpochRunner:
    """The two epoch loops of ``fit``; each is a generator that trains one epoch per
    ``next`` and yields its metrics ({name: (steps,) or (steps, S) numpy array}), keeping
    the state, the step count and the timings on ``self``."""

    def __init__(self, method: Method, graphdef: Any, optim: OptimConfig, fixed: TrainInputs,
                 seeds: int):
        self.method, self.graphdef, self.optim, self.fixed, self.seeds = method, graphdef, optim, fixed, seeds
        self.state: Any = None
        self.seen, self.train_seconds, self.compile_seconds, self.num_devices = 0, 0.0, 0.0, 1
        self.dispatches_per_epoch = 0  # of the on-device loop

    def on_device(self, state: TrainState, data: DeviceEpochs, epochs: int
                  ) -> Iterator[dict[str, np.ndarray]]:
        seeds, loader = self.seeds, data.loader
        length = len(data.splits[0])
        if any(len(split) != length for split in data.splits):
            raise ValueError(f"seeds trained in one program need equal training splits; got "
                             f"{[len(split) for split in data.splits]} samples")
        batch_size = loader.batch_size
        parallel = DataParallel.over_local_devices(batch_size, batch_axis=0 if seeds == 1 else 1)
        self.num_devices = parallel.num_devices
        start = time.perf_counter()
        split = put_split(_stack_splits(data.splits), parallel.replicated)
        keys = jnp.stack([jax.random.key(seed) for seed in data.seeds])
        keys = parallel.replicate(keys[0] if seeds == 1 else keys)
        step = parallel.replicate(jnp.int32(0))
        state = parallel.replicate(state)
        fixed = parallel.replicate(self.fixed)
        rows = self._rows(data, length, 0, parallel)
        steps = length // batch_size
        chunk = steps_per_dispatch(data.steps_per_dispatch, steps)
        lengths = [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])
        programs = {n: train_chunk.lower(self.method, self.graphdef, self.optim, loader, parallel, n,
                                         state, step, split, rows, keys, fixed).compile()
                    for n in sorted(set(lengths))}
        self.compile_seconds = time.perf_counter() - start
        self.dispatches_per_epoch = len(lengths)
        for epoch in range(epochs):
            start = time.perf_counter()
            metrics = []
            with jax.transfer_guard("disallow"):  # within an epoch, only the explicit copies below
                for n in lengths:
                    state, step, chunk_metrics = programs[n](state, step, split, rows, keys, fixed)
                    metrics.append(chunk_metrics)
                if epoch + 1 < epochs:  # the next epoch's rows cross while this one runs
                    rows = self._rows(data, length, epoch + 1, parallel)
                metrics = jax.device_get(metrics)  # waits for the epoch
            self.state = state
            self.train_seconds += time.perf_counter() - start
            self.seen += steps * batch_size
            yield {k: np.concatenate([m[k] for m in metrics]) for k in metrics[0]}

    @staticmethod
    def _rows(data: DeviceEpochs, length: int, epoch: int, parallel: "DataParallel") -> jax.Array:
        rows = [epoch_rows(length, data.loader.batch_size, seed, epoch) for seed in data.seeds]
        return parallel.replicate(rows[0] if len(rows) == 1 else np.stack(rows))

    def from_host(self, state: TrainState, data: list[Callable[[int], Iterator[Batch]]], epochs: int
                  ) -> Iterator[dict[str, np.ndarray]]:
        seeds = self.seeds
        step_fn, batch_axis = (train_step, 0) if seeds == 1 else (train_step_seeds, 1)
        total_steps = max(self.optim.total_steps, 1)
        step = 0
        parallel: DataParallel | None = None

        def put(batch: Batch) -> Batch:
            nonlocal parallel, state
            if parallel is None:  # decided on the first batch: its size must split evenly
                parallel = DataParallel.over_local_devices(batch.y.shape[batch_axis], batch_axis)
                self.num_devices = parallel.num_devices
                state = parallel.replicate(state)
            return parallel.put(batch)

        for epoch in range(epochs):
            epoch_metrics: list[dict[str, jax.Array]] = []
            start = time.perf_counter()
            parts = zip(*(batches(epoch) for batches in data), strict=True)
            # host arrays in the device pytrees' places: jit takes NumPy arguments as they are
            stacked = (p[0] if seeds == 1 else Batch(*(cast(jax.Array, np.stack(a)) for a in zip(*p)))
                       for p in parts)
            for batch in prefetch(stacked, put):
                inputs = TrainInputs(cast(jax.Array, np.float32(step / total_steps)), self.fixed.lo, self.fixed.hi)
                state, metrics = step_fn(self.method, self.graphdef, self.optim, state, batch, inputs)
                if step == 0:
                    jax.block_until_ready(state.params)
                    self.compile_seconds = time.perf_counter() - start
                    start = time.perf_counter()
                epoch_metrics.append(metrics)
                step += 1
                self.seen += int(batch.y.shape[batch_axis])
            epoch_metrics = jax.device_get(epoch_metrics)  # waits for the epoch's steps
            self.state = state
            self.train_seconds += time.perf_counter() - start
            yield {k: np.stack([m[k] for m in epoch_metrics]) for k in epoch_metrics[0]}


def prefetch(batches: Iterator[Batch], put: Callable[[Batch], Batch], ahead: int = 2) -> Iterator[Batch]:
    """``batches`` passed through ``put`` (a copy to the device, which returns at once)
    ``ahead - 1`` batches before they are used: with 2, the next batch crosses while the
    current step runs (double buffering)."""
    queue: collections.deque[Batch] = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) >= ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _stack_splits(splits: tuple[ArraySplit, ...]) -> ArraySplit:
    """One split, or the seeds' splits stacked on a leading axis (images once when equal)."""
    if len(splits) == 1:
        return splits[0]
    first = splits[0].images
    shared = all(s.images is first or np.array_equal(s.images, first) for s in splits[1:])
    images = first if shared else np.stack([s.images for s in splits])
    return ArraySplit(images, np.stack([s.y for s in splits]), np.stack([s.t for s in splits]))
