"""The embedded default dataset: scikit-learn's handwritten digits with three specialists.

Written on first use as 8x8 grayscale PNG files plus manifests, idempotently. To leave
room for deferral the classifier sees the images with additive Gaussian pixel noise
(sigma = ``NOISE_SIGMA`` of the intensity range), while the three simulated experts are
class specialists who answer from the clean digit: correct w.p. ``P_IN`` on their
classes and ``P_OUT`` elsewhere. No single agent is good everywhere, so a good router
beats the classifier alone and the best single expert.

Test images carry one fixed noise draw baked into the PNGs. Training images are stored
clean and the preset's loader adds a fresh draw of the same noise every epoch
(``augment.noise_std``): with baked training noise the classifier memorises the 1,258
training images, looks near-perfect on them, and every EM-style method then learns
never to defer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datasets.generators import class_specialist_labels
from datasets.manifest import write_manifest
from datasets.materialise import materialise

NOISE_SIGMA = 0.4
EXPERT_CLASSES = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))
P_IN = 0.95
P_OUT = 0.3
TEST_FRACTION = 0.3
SEED = 0
VERSION = 2  # bump when anything above changes: the data is rewritten


def _corrupt(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Digits (N, 8, 8) in [0, 16] -> noisy uint8 images."""
    noisy = images / 16.0 + NOISE_SIGMA * rng.normal(size=images.shape)
    return np.round(np.clip(noisy, 0.0, 1.0) * 255).astype(np.uint8)


def materialise_digits(root: str | Path) -> Path:
    """Write the digits dataset under ``root`` unless an up-to-date copy is there."""
    identity = {
        "builder": "digits",
        "version": VERSION,
        "source": "sklearn.datasets.load_digits",
        "noise_sigma": NOISE_SIGMA,
        "expert_classes": [list(c) for c in EXPERT_CLASSES],
        "p_in": P_IN,
        "p_out": P_OUT,
    }
    return materialise(Path(root), identity, _write_digits, cleanup=("train", "test"))


def _write_digits(root: Path) -> dict:
    """PNG files + manifests of both splits; returns the stamp's summary."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(SEED)
    noisy = _corrupt(digits.images, rng)
    clean = np.round(digits.images / 16.0 * 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = rng.permutation(len(labels))
    num_test = int(round(TEST_FRACTION * len(labels)))
    splits = {"test": np.sort(order[:num_test]), "train": np.sort(order[num_test:])}
    for split, rows in splits.items():
        files = [f"{split}/{labels[i]}/{i:04d}.png" for i in rows]
        images = noisy if split == "test" else clean
        for file, i in zip(files, rows):
            (root / file).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(root / file)
        write_manifest(root / f"{split}_ground_truth.json", files, labels[rows])
        for j, classes in enumerate(EXPERT_CLASSES):
            expert = class_specialist_labels(
                labels[rows], classes, P_IN, P_OUT, 10, seed=SEED + 100 * (split == "test") + j
            )
            write_manifest(root / f"{split}_expert_{j}.json", files, expert)
    return {
        "splits": {split: len(rows) for split, rows in splits.items()},
        "noise": "baked into test images; added afresh per epoch to training images",
    }
