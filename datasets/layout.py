"""A dataset on disk: its manifests joined into arrays, with cross-manifest checks.

``load_split`` joins a ground-truth manifest with one manifest per expert; an expert that
did not annotate a sample gets ``MISSING`` (-1) there. All checks run here, before any
training, and raise ``ManifestError`` naming the file and record at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from core.spec import MISSING
from datasets.manifest import Manifest, ManifestError, read_manifest


@dataclass(frozen=True)
class SplitData:
    """One split joined across manifests (rows in ground-truth manifest order).

    files: sample paths relative to ``root``; y: (N,) int class; y_probs: (N, K) soft
    ground truth (one-hot for hard labels); t: (N, E) int expert labels, MISSING if absent.
    """

    root: Path
    files: tuple[str, ...]
    y: np.ndarray
    y_probs: np.ndarray
    t: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_experts(self) -> int:
        return self.t.shape[1]


def inside(real_root: Path, path: Path) -> bool:
    """Whether ``path``, with every symbolic link resolved, lies below ``real_root``."""
    try:
        path.resolve().relative_to(real_root)
    except ValueError:
        return False
    return True


def _join_expert(gt_index: dict[str, int], expert: Manifest) -> np.ndarray:
    column = np.full(len(gt_index), MISSING, dtype=np.int32)
    labels = expert.hard_labels()
    for record, (file, label) in enumerate(zip(expert.files, labels)):
        row = gt_index.get(file)
        if row is None:
            raise ManifestError(
                f"{expert.path}, record {record}: file {file!r} is not in the ground-truth "
                "manifest of this split."
            )
        column[row] = label
    return column


def load_split(
    root: str | Path,
    ground_truth: str | Path,
    experts: Sequence[str | Path],
    num_classes: int,
    *,
    require_complete: bool = False,
    check_files: bool = True,
) -> SplitData:
    """Read, validate and join one split's manifests (paths relative to ``root``).

    ``require_complete`` demands every expert annotated every sample (test splits).
    ``check_files`` checks that every image file exists under ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: dataset root does not exist or is not a directory.")
    gt = read_manifest(root / ground_truth, num_classes)
    if len(gt.files) == 0:
        raise ManifestError(f"{gt.path}: the ground-truth manifest is empty.")
    gt_index = {file: row for row, file in enumerate(gt.files)}
    columns = []
    for expert_path in experts:
        expert = read_manifest(root / expert_path, num_classes)
        column = _join_expert(gt_index, expert)
        if require_complete and (column == MISSING).any():
            first = gt.files[int(np.flatnonzero(column == MISSING)[0])]
            raise ManifestError(
                f"{expert.path}: test expert annotations must be complete, but "
                f"{int((column == MISSING).sum())} samples are missing (first: {first!r})."
            )
        columns.append(column)
    if check_files:
        real_root = root.resolve()
        for record, file in enumerate(gt.files):
            if not (root / file).is_file():
                raise ManifestError(
                    f"{gt.path}, record {record}: image file {file!r} does not exist under {root}."
                )
            if not inside(real_root, root / file):
                raise ManifestError(
                    f"{gt.path}, record {record}: image file {file!r} resolves through a symbolic "
                    f"link to {(root / file).resolve()}, outside the dataset root {real_root}."
                )
    t = np.stack(columns, axis=1) if columns else np.zeros((len(gt.files), 0), np.int32)
    y_probs = gt.labels if gt.is_soft else np.eye(num_classes, dtype=np.float32)[gt.labels]
    return SplitData(
        root=root,
        files=gt.files,
        y=gt.hard_labels().astype(np.int32),
        y_probs=y_probs.astype(np.float32),
        t=t.astype(np.int32),
    )


def check_expert_counts(train: SplitData, test: SplitData, where: str) -> None:
    """Train and test must have the same experts (same count, same order)."""
    if train.num_experts != test.num_experts:
        raise ManifestError(
            f"{where}: train lists {train.num_experts} expert manifests but test lists "
            f"{test.num_experts}; every expert needs a manifest in both splits."
        )
