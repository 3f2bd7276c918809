"""Train a method and predict the test set, memoised on disk by a key of everything that
changes the trained model.

Methods whose training ignores the workload (``workload_in_training = False``) get the same
key under every workload, so they train once per (dataset, method variant, missing rate,
training settings, seed) and are re-scored under each workload by the evaluator.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from benchmark.config import RunConfig
from benchmark.data import CellData
from benchmark.evaluator import imputation_accuracy
from benchmark.identity import stable_hash
from datasets.manifest import atomic_write_bytes


def training_key(run: RunConfig, data: CellData, method_id: str | None = None) -> str:
    """Hash of everything that can change the trained model and its test outputs
    (``method_id`` replaces the method's repr: a shared training problem's name)."""
    from benchmark.provenance import code_hash, file_sha256

    dataset = dataclasses.replace(run.dataset, name="", cache=False, builder=None)
    payload = {
        "code": code_hash(),
        "method": method_id or repr(run.method),
        "train": dataclasses.asdict(run.train),
        "dataset": repr(dataset),
        "missing_rate": run.missing_rate,
        "manifests": {k: file_sha256(p) for k, p in sorted(data.manifests.items())},
        "seed": run.seed,
        "validation": (run.validation_fraction, run.validation_seed),
        "bounds": dataclasses.asdict(run.bounds) if run.method.workload_in_training else None,
    }
    return stable_hash(payload, 20)


SPLITS = ("test", "validation")
OUTPUTS = ("logits", "probs", "scores")


def train_and_predict(run: RunConfig, data: CellData) -> dict:
    """Train the method; returns ``{"test": outputs, "validation": outputs | None,
    "run_metrics": {...}}`` with outputs ``{"logits", "probs", "scores"}`` (numpy)."""
    from tqdm.auto import tqdm

    from benchmark import training
    from benchmark.spec import Batch
    from datasets.source import Augment, epoch_batches

    method, seed = run.method, run.seed
    batch_size = min(run.train.batch_size, len(data.train))
    epochs = run.train.epochs if method.trains else 0
    loader = run.dataset.loader(batch_size)
    optim = training.OptimConfig(
        learning_rate=run.train.learning_rate,
        momentum=run.train.momentum,
        weight_decay=run.train.weight_decay,
        total_steps=max(1, epochs * (len(data.train) // batch_size)),
    )
    model = training.init_model(method, run.spec, seed)
    method.prepare(model, data.train)
    # per-epoch bar in a terminal only (disable=None): a log file gets the grid's lines
    bar = tqdm(total=epochs, desc=f"{method.name} seed {seed}", unit="epoch", leave=False,
               disable=None)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
        bar.update()

    shared = None  # a training problem shared with other methods: train it once
    if method.training_problem is not None:
        problem = method.training_problem
        shared = run.cache_dir / f"trained-{problem}-{training_key(run, data, problem)}.npz"
    trained = None
    if shared is not None and shared.is_file() and not run.force:
        trained = training.restore_trained(method, model, shared)
    if trained is None:
        trained = training.fit(
            method, model,
            lambda epoch: epoch_batches(data.train, loader, seed=seed, epoch=epoch),
            epochs=epochs, optim=optim, bounds=run.bounds, progress=on_epoch,
        )
        if shared is not None:
            training.save_trained(trained, shared)
    bar.close()
    eval_loader = dataclasses.replace(loader, augment=Augment(), drop_remainder=False)

    def outputs(split, corrupt=False):
        if split is None:
            return None
        batches = epoch_batches(split, dataclasses.replace(loader, drop_remainder=False)
                                if corrupt else eval_loader,
                                seed=run.validation_seed, epoch=0, shuffle=False, corrupt=corrupt)
        return trained.predict(np.concatenate([b.x for b in batches]))

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
        "run_metrics": {
            "train_seconds": trained.train_seconds,
            "compile_seconds": trained.compile_seconds,
            "samples_per_second": trained.samples_seen / trained.train_seconds
            if trained.train_seconds > 0 else None,
            "imputation_accuracy": imputed,
            "num_devices": trained.num_devices,
            **trained.diagnostics(first_batch, run.bounds),
        },
    }


def cached_predictions(run: RunConfig, data: CellData) -> dict:
    """``train_and_predict`` memoised under ``run.cache_dir`` by ``training_key``."""
    path = run.cache_dir / f"{run.method.name}-{training_key(run, data)}.npz"
    if path.is_file() and not run.force:
        with np.load(path, allow_pickle=False) as saved:
            return {
                **{split: {name: saved[f"{split}/{name}"] for name in OUTPUTS}
                   if f"{split}/logits" in saved else None for split in SPLITS},
                "run_metrics": json.loads(str(saved["run_metrics"])),
            }
    out = train_and_predict(run, data)
    arrays = {f"{split}/{name}": out[split][name]
              for split in SPLITS if out[split] is not None for name in OUTPUTS}
    buffer = io.BytesIO()
    np.savez(buffer, run_metrics=json.dumps(out["run_metrics"]), **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return out
