"""Train a method and predict the test set, memoised on disk by a key of everything that
changes the trained model.

The key is a projection of the cell's ``benchmark.identity.CellIdentity`` (its ``result``
settings), of the workload bounds the method trains with and of the content of the code,
manifests and images. Methods whose training ignores the workload
(``workload_in_training = False``) get the same key under every workload, so they train once
per (dataset, method variant, missing rate, training settings, seed) and are re-scored under
each workload by the evaluator. Neutral settings never enter it: a streamed run
(``dataset.cache=false``) reuses what an in-memory run cached (its batches draw augmentation
per sample: the same distribution, other draws). With ``seeds_per_program`` > 1, a block of
consecutive seeds trains as one program (the identity's ``block_key`` names its lock) and
each seed's outputs are cached under that seed's own key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable

import numpy as np

from benchmark import training
from benchmark.config import RunConfig
from benchmark.data import CellData
from benchmark.evaluator import imputation_accuracy
from benchmark.identity import CellIdentity
from benchmark.provenance import code_hash, file_sha256
from core.files import exclusive_lock, read_cache, write_cache
from core.spec import Batch
from datasets.source import ArraySplit, Augment, LoaderConfig, epoch_batches


def identity_of(run: RunConfig) -> CellIdentity:
    """The cell's identity, which the runner hands to ``RunConfig.build``."""
    if run.identity is None:
        raise ValueError("this RunConfig has no CellIdentity: build it with "
                         "RunConfig.build(cell, base, CellIdentity.of(cell, choices)).")
    return run.identity


def training_key(run: RunConfig, data: CellData, problem: str | None = None) -> str:
    """``CellIdentity.training_key``: the cell's result settings with the content of the
    code, the manifests and the images (``problem``: a shared training problem's name)."""
    contents = {
        "code": code_hash(),
        "manifests": {k: file_sha256(p) for k, p in sorted(data.manifests.items())},
        "images": data.image_digests,  # an edited image retrains
    }
    return identity_of(run).training_key(contents, trained_bounds(run), problem)


def block_key(run: RunConfig) -> str:
    """``CellIdentity.block_key`` of the block of seeds ``run``'s seed trains with."""
    return identity_of(run).block_key(seed_block(run.seed, run.seeds_per_program), trained_bounds(run))


def trained_bounds(run: RunConfig) -> dict | None:
    """The workload bounds the method trains with; None if its training ignores them."""
    return dataclasses.asdict(run.bounds) if run.method.workload_in_training else None


SPLITS = ("test", "validation")
OUTPUTS = ("logits", "probs", "scores")


def seed_block(seed: int, size: int) -> list[int]:
    """The seeds trained in one program with ``seed``: blocks of ``size`` consecutive seeds."""
    first = seed - seed % size
    return list(range(first, first + size))


def train_and_predict(cells: list[tuple[RunConfig, CellData]]) -> list[dict]:
    """Train the method for each (run, data) of ``cells`` (the same cell under different
    seeds: one vmapped program when there are several) and predict; returns per cell
    ``{"test": outputs, "validation": outputs | None, "run_metrics": {...}}`` with outputs
    ``{"logits", "probs", "scores"}`` (numpy)."""
    from tqdm.auto import tqdm


    run = cells[0][0]
    method = run.method
    train_size = len(cells[0][1].train)
    batch_size = min(run.train.batch_size, train_size)
    epochs = run.train.epochs if method.trains else 0
    loader = run.dataset.loader(batch_size)
    optim = training.OptimConfig.for_training(
        run.train, total_steps=max(1, epochs * (train_size // batch_size)))
    models, trained, shared = [], [], []
    for cell_run, data in cells:
        model = training.init_model(method, cell_run.spec, cell_run.seed, cell_run.train.precision)
        method.prepare(model, data.train)
        path = None  # a training problem shared with other methods: train it once
        if method.training_problem is not None:
            problem = method.training_problem
            path = cell_run.cache_dir / f"trained-{problem}-{training_key(cell_run, data, problem)}.npz"
        restored = None
        if path is not None and not cell_run.force:
            restored = training.restore_trained(method, model, path)
        models.append(model)
        trained.append(restored)
        shared.append(path)
    todo = [i for i, done in enumerate(trained) if done is None]
    if todo:
        seeds = ",".join(str(cells[i][0].seed) for i in todo)
        # per-epoch bar in a terminal only (disable=None): a log file gets the grid's lines
        bar = tqdm(total=epochs, desc=f"{method.name} seed {seeds}", unit="epoch", leave=False,
                   disable=None)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
            bar.update()

        fitted = training.fit(method, [models[i] for i in todo],
                              _training_data(run, [cells[i] for i in todo], loader), epochs=epochs,
                              optim=optim, bounds=run.bounds, progress=on_epoch)
        bar.close()
        for i, model in zip(todo, fitted):
            trained[i] = model
            shared_path = shared[i]
            if shared_path is not None:
                training.save_trained(model, shared_path)
    return [_predict(cell_run, data, model, loader) for (cell_run, data), model in zip(cells, trained)]


def _training_data(run: RunConfig, cells: list[tuple[RunConfig, CellData]], loader: LoaderConfig):
    """What ``training.fit`` trains on: in-memory splits for the on-device epoch loop
    (``train.loop`` auto or device), else each seed's host batches."""
    splits = [data.train for _, data in cells]
    in_memory = all(isinstance(split, ArraySplit) for split in splits)
    if run.train.loop == "device" and not in_memory:
        raise ValueError("train.loop=device needs the training images in memory, but this dataset "
                         "is streamed from disk; set train.loop=auto (or host), or dataset.cache=true "
                         "with a dataset.memory_limit_mb the decoded images fit in.")
    if in_memory and run.train.loop != "host":
        return training.DeviceEpochs(tuple(splits), loader, tuple(cell.seed for cell, _ in cells),
                                     run.train.steps_per_dispatch)
    return [functools.partial(_train_batches, data, loader, cell.seed) for cell, data in cells]


def _train_batches(data: CellData, loader: LoaderConfig, seed: int, epoch: int):
    return epoch_batches(data.train, loader, seed=seed, epoch=epoch)


def _predict(run: RunConfig, data: CellData, trained, loader) -> dict:
    """Test and validation outputs of a trained model, with its run metrics."""
    eval_loader = dataclasses.replace(loader, augment=Augment(), drop_remainder=False)

    def outputs(split, corrupt=False):
        if split is None:
            return None
        batches = epoch_batches(split, dataclasses.replace(loader, drop_remainder=False)
                                if corrupt else eval_loader,
                                seed=run.validation_seed, epoch=0, shuffle=False, corrupt=corrupt)
        parts = [trained.predict(batch.x) for batch in batches]  # streamed data: batch by batch
        return {name: np.concatenate([part[name] for part in parts]) for name in OUTPUTS}

    imputed = None
    if data.train_complete_t is not None:
        train_batches = epoch_batches(data.train, eval_loader, seed=0, epoch=0, shuffle=False)
        q_t = trained.impute([Batch(*b) for b in train_batches], run.bounds)
        if q_t is not None:
            imputed = imputation_accuracy(q_t, data.train.t, data.train_complete_t)
    first_batch = next(iter(epoch_batches(data.train, eval_loader, seed=0, epoch=0, shuffle=False)))
    return {
        "test": outputs(data.test),
        # validation images come from the training split: they get the training inputs'
        # corruption (one fixed draw), as the test images of a corrupted dataset have it baked in
        "validation": outputs(data.validation, corrupt=True),
        "history": trained.history,  # training metrics per epoch
        "run_metrics": {
            "train_seconds": trained.train_seconds,
            "compile_seconds": trained.compile_seconds,
            "samples_per_second": trained.samples_seen / trained.train_seconds
            if trained.train_seconds > 0 else None,
            "imputation_accuracy": imputed,
            "num_devices": trained.num_devices,
            "seeds_in_program": trained.seeds_in_program,
            **trained.diagnostics(first_batch, run.bounds),
        },
    }


def _prediction_path(run: RunConfig, data: CellData) -> Path:
    return run.cache_dir / f"{run.method.name}-{training_key(run, data)}.npz"


def _load_predictions(path: Path) -> dict | None:
    def read(saved):
        return {
            **{split: {name: saved[f"{split}/{name}"] for name in OUTPUTS}
               if f"{split}/logits" in saved else None for split in SPLITS},
            "run_metrics": json.loads(str(saved["run_metrics"])),
            "history": json.loads(str(saved["history"])) if "history" in saved else [],
        }

    return read_cache(path, read, "predictions")


def _save_predictions(path: Path, out: dict) -> None:
    arrays = {f"{split}/{name}": out[split][name]
              for split in SPLITS if out[split] is not None for name in OUTPUTS}
    write_cache(path, run_metrics=json.dumps(out["run_metrics"]),
                history=json.dumps(out.get("history") or []), **arrays)


def cached_predictions(run: RunConfig, data: CellData,
                       seed_cell: Callable[[int], tuple[RunConfig, CellData]] | None = None) -> dict:
    """``train_and_predict`` memoised under ``run.cache_dir`` by ``training_key``.

    With ``run.seeds_per_program > 1`` and ``seed_cell`` (the (run, data) of this cell under
    another seed), the seeds of this seed's block whose outputs are not cached yet train
    together in one program, and each seed's outputs are cached for its own cell. ``force``
    retrains this seed alone.
    """
    path = _prediction_path(run, data)
    cached = None if run.force else _load_predictions(path)
    if cached is not None:
        return cached
    if run.force or seed_cell is None or run.seeds_per_program == 1:
        out = train_and_predict([(run, data)])[0]
        _save_predictions(path, out)
        return out
    # one process trains a block; another one asking for it meanwhile waits, then reads
    block = seed_block(run.seed, run.seeds_per_program)
    with exclusive_lock(run.cache_dir / f"block-{run.method.name}-{block_key(run)}.lock"):
        cached = _load_predictions(path)
        if cached is not None:
            return cached
        cells = [(run, data)] + [seed_cell(seed) for seed in block if seed != run.seed]
        cells = [cell for cell in cells if cell[0] is run or not _prediction_path(*cell).is_file()]
        outs = train_and_predict(cells)
        for cell, out in zip(cells, outs):
            _save_predictions(_prediction_path(*cell), out)
    return outs[0]
