"""JSON manifests: the on-disk format of every dataset, parsed and validated.

A manifest is a JSON list of records ``{"file": <path relative to the dataset root>,
"label": <int class> | [<float> x K]}``. Every problem is reported as a
``ManifestError`` that names the file and, where there is one, the record.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence, cast

import numpy as np

from core.files import atomic_write_text


class ManifestError(ValueError):
    """A manifest or dataset layout is invalid (message names the file and record)."""


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: sample files in manifest order and their labels.

    ``labels`` is (N,) int64 for hard labels or (N, K) float32 for soft labels.
    """

    path: Path
    files: tuple[str, ...]
    labels: np.ndarray

    @property
    def is_soft(self) -> bool:
        return self.labels.ndim == 2

    def hard_labels(self) -> np.ndarray:
        """(N,) int labels; soft labels become their argmax."""
        return self.labels.argmax(axis=1) if self.is_soft else self.labels

    def as_dict(self) -> dict[str, int]:
        """file -> hard label."""
        return dict(zip(self.files, self.hard_labels().tolist()))


def _check_relative(path: str, where: str) -> None:
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or os.path.isabs(path) or ".." in pure.parts:
        raise ManifestError(
            f"{where}: file path {path!r} escapes the dataset root; manifest paths must be "
            "relative to the root and must not contain '..'."
        )


def _parse_label(label, num_classes: int, where: str):
    if isinstance(label, bool):
        raise ManifestError(f"{where}: label {label!r} is a boolean, expected an int class.")
    if isinstance(label, (int, np.integer)):
        if not 0 <= label < num_classes:
            raise ManifestError(
                f"{where}: label {label} is outside [0, {num_classes}) (num_classes={num_classes})."
            )
        return int(label)
    if isinstance(label, float) and label.is_integer():
        return _parse_label(int(label), num_classes, where)
    if isinstance(label, list):
        if len(label) != num_classes:
            raise ManifestError(
                f"{where}: soft label has {len(label)} entries, expected num_classes={num_classes}."
            )
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in label):
            raise ManifestError(f"{where}: soft label must be a list of numbers, got {label!r}.")
        probs = np.asarray(label, dtype=np.float64)
        if (probs < 0).any() or not np.isclose(probs.sum(), 1.0, atol=1e-3):
            raise ManifestError(
                f"{where}: soft label must be non-negative and sum to 1 (sums to {probs.sum():.4f})."
            )
        return probs
    raise ManifestError(
        f"{where}: label {label!r} must be an int class or a list of {num_classes} floats."
    )


def read_manifest(path: str | Path, num_classes: int) -> Manifest:
    """Parse and validate one manifest file (structure, paths, labels, duplicates);
    memoised while the file's size and mtime are unchanged (labels are read-only)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file does not exist.")
    stat = path.stat()
    return _read_manifest(path, num_classes, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _read_manifest(path: Path, num_classes: int, size: int, mtime_ns: int) -> Manifest:
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: cannot read the manifest as JSON ({err}).") from None
    if not isinstance(records, list):
        raise ManifestError(
            f"{path}: a manifest must be a JSON list of records, got {type(records).__name__}."
        )
    labels_by_file: dict[str, object] = {}
    for index, record in enumerate(records):
        where = f"{path}, record {index}"
        if not isinstance(record, dict) or "file" not in record or "label" not in record:
            raise ManifestError(
                f"{where}: each record must be an object with 'file' and 'label', got {record!r}."
            )
        file = record["file"]
        if not isinstance(file, str) or not file:
            raise ManifestError(f"{where}: 'file' must be a non-empty string, got {file!r}.")
        _check_relative(file, where)
        file = PurePosixPath(file).as_posix()  # one name per image: ./a/b.png and a//b.png are a/b.png
        label = _parse_label(record["label"], num_classes, where)
        if file in labels_by_file:
            previous = labels_by_file[file]
            if not np.array_equal(np.asarray(previous), np.asarray(label)):
                same = "" if file == record["file"] else f" (the image {file!r})"
                raise ManifestError(
                    f"{where}: duplicate file {record['file']!r}{same} with conflicting labels "
                    f"{previous!r} and {label!r}."
                )
            continue
        labels_by_file[file] = label
    files = tuple(labels_by_file)
    values = list(labels_by_file.values())
    soft = any(isinstance(v, np.ndarray) for v in values)
    if soft:
        labels = np.stack(
            [v if isinstance(v, np.ndarray) else np.eye(num_classes)[cast(int, v)] for v in values]
        ).astype(np.float32) if values else np.zeros((0, num_classes), np.float32)
    else:
        labels = np.asarray(values, dtype=np.int64)
    labels.setflags(write=False)
    return Manifest(path=path, files=files, labels=labels)


def write_manifest(path: str | Path, files: Sequence[str], labels) -> Path:
    """Write a manifest atomically; ``labels`` are ints or rows of K floats."""
    path = Path(path)
    records = []
    for file, label in zip(files, labels, strict=True):
        value = np.asarray(label)
        records.append(
            {"file": str(file), "label": value.tolist() if value.ndim else int(value)}
        )
    atomic_write_text(path, json.dumps(records, indent=1))
    return path
