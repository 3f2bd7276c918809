"""Synthetic experts and missing-annotation generators: accuracy, determinism, nesting."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.generators import (
    class_specialist_labels,
    confusion_matrix_labels,
    drop_annotations,
    sample_from_distribution,
)
from datasets.manifest import Manifest


def test_specialist_accuracy_matches_p_in_and_p_out():
    y = np.arange(40_000) % 10
    labels = class_specialist_labels(y, [0, 1, 2], p_in=0.9, p_out=0.2, num_classes=10, seed=1)
    inside = np.isin(y, [0, 1, 2])
    assert abs((labels[inside] == y[inside]).mean() - 0.9) < 0.01
    assert abs((labels[~inside] == y[~inside]).mean() - 0.2) < 0.01
    wrong = labels != y
    # wrong answers are spread uniformly over the 9 other classes
    offsets = (labels[wrong] - y[wrong]) % 10
    counts = np.bincount(offsets, minlength=10)[1:]
    assert counts.min() > 0.8 * counts.mean()


def test_specialist_is_deterministic_under_seed():
    y = np.arange(500) % 10
    a = class_specialist_labels(y, [3], 0.8, 0.3, 10, seed=7)
    b = class_specialist_labels(y, [3], 0.8, 0.3, 10, seed=7)
    c = class_specialist_labels(y, [3], 0.8, 0.3, 10, seed=8)
    assert (a == b).all() and (a != c).any()


def test_specialist_rejects_bad_probability():
    with pytest.raises(ValueError, match="p_in must be in"):
        class_specialist_labels(np.zeros(3, int), [0], 1.5, 0.1, 3, seed=0)


def test_confusion_matrix_expert_follows_rows():
    confusion = np.array([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    y = np.repeat([0, 1, 2], 20_000)
    labels = confusion_matrix_labels(y, confusion, seed=0)
    for c in range(3):
        freq = np.bincount(labels[y == c], minlength=3) / 20_000
        np.testing.assert_allclose(freq, confusion[c], atol=0.015)


def test_confusion_matrix_must_be_stochastic():
    with pytest.raises(ValueError, match="rows must be non-negative and sum to 1"):
        confusion_matrix_labels(np.zeros(2, int), np.array([[0.5, 0.4], [0, 1]]), 0)


def test_sample_from_distribution_frequencies():
    probs = np.tile([0.1, 0.6, 0.3], (30_000, 1))
    labels = sample_from_distribution(probs, seed=3)
    np.testing.assert_allclose(np.bincount(labels) / len(labels), [0.1, 0.6, 0.3], atol=0.01)


def _experts(num_samples: int, num_experts: int) -> tuple[list[str], list[Manifest]]:
    files = [f"f{i}.png" for i in range(num_samples)]
    experts = [Manifest(path=None, files=tuple(files), labels=np.full(num_samples, j)) for j in range(num_experts)]
    return files, experts


def test_missing_rate_and_nesting_across_rates():
    files, experts = _experts(5000, 3)
    kept = {r: [set(f) for f, _ in drop_annotations(experts, files, r, seed=11)] for r in (0.0, 0.3, 0.5, 0.7, 1.0)}
    for r, per_expert in kept.items():
        for observed in per_expert:
            assert abs(len(observed) / 5000 - (1 - r)) < 0.025
    for low, high in ((0.0, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 1.0)):
        for j in range(3):
            assert kept[high][j] <= kept[low][j]  # missing at low rate => missing at high rate


def test_missing_is_deterministic_and_keeps_labels():
    files, experts = _experts(200, 2)
    a = drop_annotations(experts, files, 0.5, seed=4)
    b = drop_annotations(experts, files, 0.5, seed=4)
    c = drop_annotations(experts, files, 0.5, seed=5)
    assert [f for f, _ in a] == [f for f, _ in b]
    assert [f for f, _ in a] != [f for f, _ in c]
    assert all((labels == j).all() for j, (_, labels) in enumerate(a))


def test_missing_independent_of_expert_manifest_order():
    files, experts = _experts(300, 1)
    reordered = [Manifest(path=None, files=tuple(reversed(files)), labels=np.zeros(300, int))]
    a = set(drop_annotations(experts, files, 0.4, seed=2)[0][0])
    b = set(drop_annotations(reordered, files, 0.4, seed=2)[0][0])
    assert a == b
