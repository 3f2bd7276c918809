"""Seeded generators: synthetic experts and missing-annotation manifests.

Everything here is a pure function of its inputs and a seed; writers produce ordinary
manifests, so generated data goes through the same validation as user data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from datasets.manifest import Manifest, write_manifest


def _wrong_label(y: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A label drawn uniformly from the classes other than ``y`` (elementwise)."""
    shift = rng.integers(1, num_classes, size=y.shape)
    return (y + shift) % num_classes


def class_specialist_labels(
    y: np.ndarray,
    classes: Sequence[int],
    p_in: float,
    p_out: float,
    num_classes: int,
    seed: int,
) -> np.ndarray:
    """Labels of an expert correct w.p. ``p_in`` on ``classes`` and ``p_out`` elsewhere.

    Wrong answers are uniform over the other classes.
    """
    for name, p in (("p_in", p_in), ("p_out", p_out)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}.")
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    p_correct = np.where(np.isin(y, list(classes)), p_in, p_out)
    correct = rng.random(y.shape) < p_correct
    return np.where(correct, y, _wrong_label(y, num_classes, rng)).astype(np.int64)


def confusion_matrix_labels(y: np.ndarray, confusion: np.ndarray, seed: int) -> np.ndarray:
    """Labels drawn from row ``y`` of a (K, K) row-stochastic confusion matrix."""
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got {confusion.shape}.")
    if (confusion < 0).any() or not np.allclose(confusion.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("confusion matrix rows must be non-negative and sum to 1.")
    return sample_from_distribution(confusion[np.asarray(y)], seed)


def sample_from_distribution(probs: np.ndarray, seed: int) -> np.ndarray:
    """One label per row of (N, K) class probabilities (e.g. human label distributions)."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    u = rng.random((probs.shape[0], 1))
    labels = (np.cumsum(probs, axis=1) < u).sum(axis=1)
    return np.minimum(labels, probs.shape[1] - 1).astype(np.int64)


def missing_uniforms(num_samples: int, num_experts: int, seed: int | None) -> np.ndarray:
    """One U(0,1) draw per (sample, expert); annotation is missing at rate r iff u < r.

    Thresholding the same draws makes missing sets nested across rates.
    """
    return np.random.default_rng(seed).random((num_samples, num_experts))


def drop_annotations(
    experts: Sequence[Manifest], ground_truth_files: Sequence[str], rate: float, seed: int | None
) -> list[tuple[list[str], np.ndarray]]:
    """Remove each (sample, expert) annotation with probability ``rate`` (MCAR, nested).

    Draws are indexed by the sample's position in the ground-truth manifest, so the same
    sample keeps the same draw whatever the order of the expert manifests.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"missing rate must be in [0, 1], got {rate}.")
    row_of = {file: row for row, file in enumerate(ground_truth_files)}
    u = missing_uniforms(len(ground_truth_files), len(experts), seed)
    kept = []
    for j, expert in enumerate(experts):
        rows = np.array([row_of[f] for f in expert.files], dtype=np.int64)
        keep = u[rows, j] >= rate
        kept.append(([f for f, k in zip(expert.files, keep) if k], expert.labels[keep]))
    return kept


def write_missing_manifests(
    experts: Sequence[Manifest],
    ground_truth_files: Sequence[str],
    rate: float,
    seed: int | None,  # None: fresh entropy (numpy's default_rng), as for an unresolved dataset.missing_seed
    out_paths: Sequence[str | Path],
) -> list[Path]:
    """Write one manifest per expert with annotations dropped at ``rate``."""
    kept = drop_annotations(experts, ground_truth_files, rate, seed)
    return [write_manifest(path, files, labels) for path, (files, labels) in zip(out_paths, kept)]


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held-out) row indices, seeded and class-stratified.

    The held-out split has exactly ``round(fraction * N)`` rows; each class contributes
    ``floor(fraction * n_c)`` plus one for the classes with the largest remainders.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}.")
    rng = np.random.default_rng(seed)
    classes, class_counts = np.unique(labels, return_counts=True)
    exact = fraction * class_counts
    quota = np.floor(exact).astype(np.int64)
    shortfall = int(round(fraction * len(labels))) - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:shortfall]] += 1
    held_out = []
    for c, take in zip(classes, quota):
        rows = rng.permutation(np.flatnonzero(labels == c))
        held_out.append(rows[:take])
    held_out_rows = np.sort(np.concatenate(held_out))
    kept_rows = np.setdiff1d(np.arange(len(labels)), held_out_rows)
    if len(held_out_rows) == 0 or len(kept_rows) == 0:
        raise ValueError(f"a held-out fraction of {fraction} of {len(labels)} samples leaves an empty split.")
    return kept_rows, held_out_rows
