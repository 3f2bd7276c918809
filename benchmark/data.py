"""A cell's data: manifests resolved (missing-annotation manifests derived), validated, decoded.

A dataset with a ``builder`` is materialised on first use when its root lies below the
repository's ``data/`` folder; a root elsewhere is the user's.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.config import ConfigError, DatasetConfig
from benchmark.provenance import REPO_ROOT

MANAGED_DATA_DIR = REPO_ROOT / "data"  # builders write only below <repo>/data


@dataclasses.dataclass(frozen=True)
class DatasetFiles:
    """Where a cell's manifests are (relative to ``root``), with the missing rate applied."""

    name: str
    root: Path
    num_classes: int
    train_ground_truth: str
    train_experts: tuple[str, ...]
    complete_experts: tuple[str, ...] | None
    test_ground_truth: str
    test_experts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CellData:
    """Everything a cell needs from the dataset, decoded in memory."""

    files: DatasetFiles
    train: Any  # datasets.source.ArraySplit
    test: Any
    train_complete_t: np.ndarray | None
    manifests: dict[str, Path]


def _is_managed(root: Path) -> bool:
    try:
        root.resolve().relative_to(MANAGED_DATA_DIR.resolve())
    except ValueError:
        return False
    return True


def missing_manifest_dir(rate: float, seed: int) -> str:
    """Folder (relative to the dataset root) of the manifests generated at ``rate``."""
    return f"missing/rate_{rate:g}/seed_{seed}"


def dataset_files(dataset: DatasetConfig, missing_rate: float) -> DatasetFiles:
    """Manifest paths of a cell (missing-annotation manifests generated here if absent)."""
    from datasets.generators import write_missing_manifests
    from datasets.manifest import ManifestError, read_manifest

    if not 0.0 <= float(missing_rate) <= 1.0:
        raise ConfigError(f"missing_rate must be in [0, 1], got {missing_rate}.")
    root = dataset.root
    if dataset.builder and _is_managed(root):
        from datasets.builders import BUILDERS

        BUILDERS.get(dataset.builder)(root, **dict(dataset.builder_args))
    if not root.is_dir():
        raise ManifestError(
            f"{root}: dataset root does not exist or is not a directory (dataset.root; "
            f"relative roots are resolved against {REPO_ROOT})."
        )
    experts, complete = dataset.train_experts, dataset.complete_experts
    if missing_rate > 0:
        folder = missing_manifest_dir(float(missing_rate), dataset.missing_seed)
        derived = tuple(f"{folder}/{Path(name).name}" for name in experts)
        if not all((root / name).is_file() for name in derived):
            gt = read_manifest(root / dataset.train_ground_truth, dataset.num_classes)
            sources = [read_manifest(root / name, dataset.num_classes) for name in experts]
            write_missing_manifests(sources, gt.files, float(missing_rate), dataset.missing_seed,
                                    [root / name for name in derived])
        complete = complete or experts
        experts = derived
    return DatasetFiles(
        name=dataset.name, root=root, num_classes=dataset.num_classes,
        train_ground_truth=dataset.train_ground_truth, train_experts=experts,
        complete_experts=complete, test_ground_truth=dataset.test_ground_truth,
        test_experts=dataset.test_experts,
    )


@functools.lru_cache(maxsize=8)
def _decode(files: DatasetFiles, image: tuple[int, int, int], cache_dir: Path | None) -> CellData:
    from datasets.layout import check_expert_counts, load_split
    from datasets.source import ImageFormat, decode_all

    fmt = ImageFormat(*image)
    train = load_split(files.root, files.train_ground_truth, files.train_experts, files.num_classes)
    test = load_split(files.root, files.test_ground_truth, files.test_experts, files.num_classes,
                      require_complete=True)
    check_expert_counts(train, test, f"dataset {files.name!r}")
    complete_t = None
    if files.complete_experts:
        complete_t = load_split(files.root, files.train_ground_truth, files.complete_experts,
                                files.num_classes, check_files=False).t
    manifests = {"train/ground_truth": files.root / files.train_ground_truth,
                 "test/ground_truth": files.root / files.test_ground_truth}
    for j, name in enumerate(files.train_experts):
        manifests[f"train/expert_{j}"] = files.root / name
    for j, name in enumerate(files.test_experts):
        manifests[f"test/expert_{j}"] = files.root / name
    return CellData(files, decode_all(train, fmt, cache_dir), decode_all(test, fmt, cache_dir),
                    complete_t, manifests)


_ERRORS: dict[tuple, Exception] = {}


def load_data(dataset: DatasetConfig, missing_rate: float) -> CellData:
    """Resolve, validate and decode a cell's data (memoised per process, errors too)."""
    key = (dataset, missing_rate)
    if key in _ERRORS:
        raise _ERRORS[key]
    try:
        files = dataset_files(dataset, missing_rate)
        cache_dir = files.root / ".cache" if dataset.cache else None
        return _decode(files, dataset.image, cache_dir)
    except Exception as err:
        _ERRORS[key] = err
        raise
