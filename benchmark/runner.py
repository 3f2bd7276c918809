"""One grid cell: data -> train (or reuse) -> evaluate -> record (atomic) -> track.

A cell is (dataset, method, missing rate, workload, seed). Its record is written
atomically to ``<results_dir>/<dataset>/<method>/mr<rate>/<workload>/seed<seed>/result.json``;
a cell whose record says "ok" for the same settings is skipped unless ``force``. Test predictions of a trained
model are cached under a key of everything that affects training, so methods whose
training ignores the workload train once per (missing rate, seed) and are evaluated
under every workload preset.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from benchmark import config as config_lib
from benchmark.evaluator import evaluate, imputation_accuracy
from benchmark.provenance import REPO_ROOT, provenance
from benchmark.spec import agent_names
from datasets.manifest import atomic_write_text

SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Cell:
    """Coordinates of one grid cell."""

    dataset: str
    method: str
    missing_rate: float
    workload: str
    seed: int

    def path(self, results_dir: Path) -> Path:
        return (
            results_dir / self.dataset / self.method / f"mr{self.missing_rate:g}"
            / self.workload / f"seed{self.seed}" / "result.json"
        )


def cell_of(cfg: Mapping[str, Any]) -> Cell:
    return Cell(
        dataset=str(cfg["dataset"]["name"]),
        method=str(cfg["method"]["name"]),
        missing_rate=float(cfg["missing_rate"]),
        workload=str(cfg["workload"]["name"]),
        seed=int(cfg["seed"]),
    )


def read_record(path: Path) -> dict | None:
    """The record at ``path``, or None if absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class CellData:
    """Everything a cell needs from the dataset, decoded in memory."""

    files: config_lib.DatasetFiles
    train: Any  # datasets.source.ArraySplit
    test: Any
    train_complete_t: np.ndarray | None
    manifests: dict[str, Path]


_DATA_ERRORS: dict[Any, Exception] = {}


@functools.lru_cache(maxsize=8)
def _load_data(files: config_lib.DatasetFiles, fmt, cache_dir: Path | None) -> CellData:
    from datasets.layout import check_expert_counts, load_split
    from datasets.source import decode_all

    train = load_split(files.root, files.train_ground_truth, files.train_experts, files.num_classes)
    test = load_split(
        files.root, files.test_ground_truth, files.test_experts, files.num_classes,
        require_complete=True,
    )
    check_expert_counts(train, test, f"dataset {files.name!r}")
    complete_t = None
    if files.complete_experts:
        complete = load_split(
            files.root, files.train_ground_truth, files.complete_experts, files.num_classes,
            check_files=False,
        )
        complete_t = complete.t
    manifests = {"train/ground_truth": files.root / files.train_ground_truth,
                 "test/ground_truth": files.root / files.test_ground_truth}
    for j, name in enumerate(files.train_experts):
        manifests[f"train/expert_{j}"] = files.root / name
    for j, name in enumerate(files.test_experts):
        manifests[f"test/expert_{j}"] = files.root / name
    return CellData(
        files=files,
        train=decode_all(train, fmt, cache_dir),
        test=decode_all(test, fmt, cache_dir),
        train_complete_t=complete_t,
        manifests=manifests,
    )


def load_data(cfg: Mapping[str, Any], base: Path) -> CellData:
    """Resolve, validate and decode the cell's dataset (errors are memoised per config)."""
    from datasets.source import ImageFormat

    key = json.dumps({"dataset": cfg["dataset"], "rate": cfg["missing_rate"]}, sort_keys=True, default=str)
    if key in _DATA_ERRORS:
        raise _DATA_ERRORS[key]
    try:
        files = config_lib.dataset_files(cfg["dataset"], float(cfg["missing_rate"]), base)
        image = cfg["dataset"]["image"]
        fmt = ImageFormat(int(image["height"]), int(image["width"]), int(image["channels"]))
        cache_dir = files.root / ".cache" if cfg["dataset"].get("cache", True) else None
        return _load_data(files, fmt, cache_dir)
    except Exception as err:
        _DATA_ERRORS[key] = err
        raise


# ----------------------------------------------------------------------------- training


def _training_key(cfg: Mapping[str, Any], method, data: CellData, bounds) -> str:
    """Hash of everything that can change the trained model."""
    from benchmark.provenance import code_hash, file_sha256

    payload = {
        "code": code_hash(),
        "method": repr(method),
        "train": cfg["train"],
        "dataset": {k: v for k, v in cfg["dataset"].items() if k != "name"},
        "manifests": {k: file_sha256(p) for k, p in sorted(data.manifests.items())},
        "seed": int(cfg["seed"]),
        "bounds": dataclasses.asdict(bounds) if method.workload_in_training else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def train_and_predict(cfg: Mapping[str, Any], method, spec, data: CellData, bounds) -> dict:
    """Train the method and return its test outputs and run metrics (numpy / floats)."""
    from tqdm.auto import tqdm

    from benchmark import training
    from benchmark.spec import Batch
    from datasets.source import Augment, LoaderConfig, epoch_batches

    train_cfg, dcfg = cfg["train"], cfg["dataset"]
    seed = int(cfg["seed"])
    batch_size = min(int(train_cfg["batch_size"]), len(data.train))
    epochs = int(train_cfg["epochs"]) if method.trains else 0
    steps_per_epoch = len(data.train) // batch_size
    loader = LoaderConfig(
        batch_size=batch_size,
        mean=tuple(dcfg["mean"]),
        std=tuple(dcfg["std"]),
        augment=Augment(**dict(dcfg.get("augment") or {})),
        drop_remainder=True,
    )
    optim = training.OptimConfig(
        learning_rate=float(train_cfg["learning_rate"]),
        momentum=float(train_cfg["momentum"]),
        weight_decay=float(train_cfg["weight_decay"]),
        total_steps=max(1, epochs * steps_per_epoch),
    )
    aux = {"lo": np.asarray(bounds.lo, np.float32), "hi": np.asarray(bounds.hi, np.float32)}
    model = training.init_model(method, spec, seed)
    method.prepare(model, data.train)
    bar = tqdm(total=epochs, desc=f"{method.name} seed {seed}", unit="epoch", leave=False)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
        bar.update()

    trained = training.fit(
        method, model,
        lambda epoch: epoch_batches(data.train, loader, seed=seed, epoch=epoch),
        epochs=epochs, optim=optim, aux=aux, progress=on_epoch,
    )
    bar.close()
    eval_loader = dataclasses.replace(loader, augment=Augment(), drop_remainder=False)
    test_x = np.concatenate([b.x for b in epoch_batches(data.test, eval_loader, seed=0, epoch=0, shuffle=False)])
    logits, scores = trained.predict(test_x)
    imputed = None
    if data.train_complete_t is not None:
        q_t = trained.impute(
            [Batch(*b) for b in epoch_batches(data.train, eval_loader, seed=0, epoch=0, shuffle=False)],
            aux,
        )
        if q_t is not None:
            imputed = imputation_accuracy(q_t, data.train.t, data.train_complete_t)
    return {
        "logits": logits,
        "scores": scores,
        "run_metrics": {
            "train_seconds": trained.train_seconds,
            "compile_seconds": trained.compile_seconds,
            "samples_per_second": trained.samples_seen / trained.train_seconds
            if trained.train_seconds > 0 else None,
            "imputation_accuracy": imputed,
        },
    }


def cached_predictions(cfg, method, spec, data, bounds, cache_dir: Path) -> dict:
    """``train_and_predict`` memoised on disk by the training key."""
    path = cache_dir / f"{method.name}-{_training_key(cfg, method, data, bounds)}.npz"
    if path.is_file() and not cfg.get("force", False):
        with np.load(path, allow_pickle=False) as saved:
            return {
                "logits": saved["logits"],
                "scores": saved["scores"],
                "run_metrics": json.loads(str(saved["run_metrics"])),
            }
    out = train_and_predict(cfg, method, spec, data, bounds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, logits=out["logits"], scores=out["scores"], run_metrics=json.dumps(out["run_metrics"]))
    tmp.replace(path)
    return out


# ----------------------------------------------------------------------------- the cell


def config_fingerprint(cfg: Mapping[str, Any]) -> str:
    """Hash of the settings that define a cell's result (a changed setting reruns it)."""
    relevant = {k: cfg.get(k) for k in ("dataset", "method", "workload", "train", "eval",
                                         "missing_rate", "seed")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_cell(cfg: Mapping[str, Any], base: Path = REPO_ROOT) -> dict:
    """Run one grid cell and write its record; never raises for a failing cell.

    Returns the record (``status`` "ok", "failed" or "skipped" for an existing ok record).
    """
    from benchmark.tracking import Tracker

    cell = cell_of(cfg)
    results_dir = config_lib.resolve_path(cfg["results_dir"], base)
    path = cell.path(results_dir)
    existing = read_record(path)
    fingerprint = config_fingerprint(cfg)
    if (existing and existing.get("status") == "ok" and not cfg.get("force", False)
            and existing.get("config_fingerprint") == fingerprint):
        return {**existing, "status": "skipped"}
    record: dict[str, Any] = {"schema": SCHEMA, "status": "failed", "error": None,
                              "cell": dataclasses.asdict(cell), "config_fingerprint": fingerprint}
    params: dict[str, Any] = {}
    try:
        data = load_data(cfg, base)
        spec = config_lib.task_spec(cfg["dataset"], data.train.t.shape[1])
        bounds = config_lib.workload_bounds(cfg["workload"], spec.num_experts)
        method = config_lib.build_method(cfg["method"], spec)
        params = {"method_config": repr(method), **{f"train.{k}": v for k, v in cfg["train"].items()}}
        out = cached_predictions(
            cfg, method, spec, data, bounds, config_lib.resolve_path(cfg["cache_dir"], base)
        )
        scores = out["scores"]
        if method.sees_test_labels:  # reference rows such as the oracle
            scores = method.scores_from_labels(out["logits"], scores, data.test.y, data.test.t)
        if not np.isfinite(scores).all() or not np.isfinite(out["logits"]).all():
            raise FloatingPointError(f"{method.name} produced non-finite test outputs.")
        metrics, curves = evaluate(
            out["logits"], scores, data.test.y, data.test.t, bounds,
            assignment_batch=cfg.get("eval", {}).get("assignment_batch"),
        )
        record.update(
            status="ok",
            agents=agent_names(spec.num_experts),
            workload_bounds={"lo": list(bounds.lo), "hi": list(bounds.hi)},
            metrics=metrics,
            run_metrics=out["run_metrics"],
            curves=curves,
            provenance=provenance(data.manifests),
        )
    except Exception as err:  # a failing cell is recorded, the sweep goes on
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
    try:
        record["mlflow_run_id"] = Tracker(cfg.get("tracking") or {}).log(record, params)
    except Exception as err:  # tracking must never lose a result
        record["tracking_error"] = f"{type(err).__name__}: {err}"
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(path, json.dumps(record, indent=1, default=float))
    return record
