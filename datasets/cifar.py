"""CIFAR-10, CIFAR-100 and CIFAR-10H: readers of the official binary layout and builders.

Binary layouts (the "binary version" downloads from https://www.cs.toronto.edu/~kriz/cifar.html):

- CIFAR-10 (``cifar-10-batches-bin/data_batch_{1..5}.bin``, ``test_batch.bin``): records of
  3,073 bytes, one label byte (0-9) then 1,024 red, 1,024 green and 1,024 blue bytes of a
  32x32 image in row-major order.
- CIFAR-100 (``cifar-100-binary/train.bin``, ``test.bin``): records of 3,074 bytes, one
  coarse label byte (0-19), one fine label byte (0-99), then the same 3,072 pixel bytes.

Builders (registered in ``datasets.builders``) write PNG files plus manifests under a dataset
root, idempotently: a ``DATASET.json`` stamp records the builder, its options and a
fingerprint of the source files; a later call with the same stamp returns at once, and a
call with different options rewrites the data (and drops the harness's derived
``missing/`` manifests and ``.cache/`` so nothing stale survives).

- ``cifar10h``: the 10,000 CIFAR-10 test images with CIFAR-10H human label distributions
  (Peterson et al., ICCV 2019). A class-stratified, seeded split (``test_fraction`` 0.2:
  8,000 train / 2,000 test). Ground truth is the official CIFAR-10 label. Each of the
  ``num_experts`` experts labels every image with one draw from that image's human label
  distribution, independently per expert and per image. This is the faithful model of the
  data: CIFAR-10H gives about 50 answers per image from a large pool of annotators, not the
  same few people on every image, so "one more annotator from the crowd" is what the
  distribution describes. A per-expert perturbation would invent specialisations the data
  does not have and move the experts' accuracy away from the humans'; with plain sampling
  each expert's expected accuracy equals the mean human probability of the true label
  (about 0.95), and expert errors concentrate on the images humans find ambiguous, which
  is what deferral has to learn. ``{split}_human_probs.json`` also holds the full human
  distributions as soft labels, for users who want them as ground truth.
- ``cifar10`` / ``cifar100``: the official train/test splits with synthetic class-specialist
  experts after the Prob-L2D paper's CIFAR-100 protocol: ``num_experts`` (3) experts, each
  a specialist on a contiguous range of the 20 coarse super-classes (CIFAR-100; ranges of
  the 10 classes for CIFAR-10), split as evenly as possible (7, 7, 6 super-classes for 3
  experts). An expert is correct with probability ``P_IN`` = 0.9 on an image of its
  super-classes and ``P_OUT`` = 0.2 elsewhere, wrong answers uniform over the other
  classes; labels are the 100 fine classes. These numbers are the harness's choice (the
  paper's exact values may differ); ``p_in`` / ``p_out`` are builder options.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from datasets.generators import class_specialist_labels, sample_from_distribution, stratified_split
from datasets.manifest import write_manifest
from datasets.materialise import check_unknown_options, materialise

IMAGE_SIZE = 32
IMAGE_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE
CIFAR10_RECORD_BYTES = 1 + IMAGE_BYTES
CIFAR100_RECORD_BYTES = 2 + IMAGE_BYTES
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR100_TRAIN_FILE = "train.bin"
CIFAR100_TEST_FILE = "test.bin"
NUM_COARSE = 20

P_IN = 0.9
P_OUT = 0.2
NUM_EXPERTS = 3
TEST_FRACTION = 0.2
VERSION = 1  # bump when the written layout or the sampling changes: data is rewritten


class CifarFormatError(ValueError):
    """A CIFAR binary file or CIFAR-10H array is malformed (message names the file)."""


# ----------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class CifarImages:
    """Decoded records: images (N, 32, 32, 3) uint8 RGB, labels (N,) int64 (fine labels
    for CIFAR-100), coarse_labels (N,) int64 for CIFAR-100 and None for CIFAR-10."""

    images: np.ndarray
    labels: np.ndarray
    coarse_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _records(data: bytes, record_bytes: int, name: str) -> np.ndarray:
    """Bytes of a binary file -> (N, record_bytes) uint8, checking the size."""
    if len(data) == 0:
        raise CifarFormatError(f"{name}: the file is empty, expected {record_bytes}-byte records.")
    if len(data) % record_bytes:
        raise CifarFormatError(
            f"{name}: size {len(data)} bytes is not a multiple of the {record_bytes}-byte record "
            f"({len(data) // record_bytes} whole records and {len(data) % record_bytes} bytes "
            "left over); the file is truncated or not in this CIFAR binary layout."
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, record_bytes)


def _pixels(records: np.ndarray) -> np.ndarray:
    """The trailing 3,072 bytes of each record (R, G, B planes) -> (N, 32, 32, 3)."""
    planes = records[:, -IMAGE_BYTES:].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1))


def _check_labels(labels: np.ndarray, limit: int, what: str, name: str, hint: str = "") -> None:
    bad = np.flatnonzero(labels >= limit)
    if bad.size:
        raise CifarFormatError(
            f"{name}, record {int(bad[0])}: {what} {int(labels[bad[0]])} is outside "
            f"[0, {limit}) ({bad.size} such records){hint}."
        )


def parse_cifar10(data: bytes, name: str = "<bytes>") -> CifarImages:
    """Decode the bytes of a CIFAR-10 binary batch (``name`` is used in errors)."""
    records = _records(data, CIFAR10_RECORD_BYTES, name)
    labels = records[:, 0].astype(np.int64)
    _check_labels(labels, 10, "label", name, "; is this a CIFAR-100 file?")
    return CifarImages(images=_pixels(records), labels=labels)


def parse_cifar100(data: bytes, name: str = "<bytes>") -> CifarImages:
    """Decode the bytes of a CIFAR-100 binary file (coarse byte, fine byte, pixels)."""
    records = _records(data, CIFAR100_RECORD_BYTES, name)
    coarse = records[:, 0].astype(np.int64)
    fine = records[:, 1].astype(np.int64)
    _check_labels(coarse, NUM_COARSE, "coarse label", name, "; is this a CIFAR-10 file?")
    _check_labels(fine, 100, "fine label", name)
    return CifarImages(images=_pixels(records), labels=fine, coarse_labels=coarse)


def read_cifar10(path: str | Path) -> CifarImages:
    """Read one CIFAR-10 binary batch file (e.g. ``test_batch.bin``)."""
    path = Path(path)
    return parse_cifar10(_read_bytes(path), str(path))


def read_cifar100(path: str | Path) -> CifarImages:
    """Read one CIFAR-100 binary file (``train.bin`` or ``test.bin``)."""
    path = Path(path)
    return parse_cifar100(_read_bytes(path), str(path))


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found.")
    return path.read_bytes()


def concatenate(parts: Sequence[CifarImages]) -> CifarImages:
    """Join several decoded batches in order."""
    coarse = [p.coarse_labels for p in parts if p.coarse_labels is not None]
    return CifarImages(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        coarse_labels=np.concatenate(coarse) if coarse and len(coarse) == len(parts) else None,
    )


def read_human_labels(source: Path, num_images: int) -> np.ndarray:
    """CIFAR-10H (N, 10) label distributions from ``cifar10h-probs.npy`` or ``-counts.npy``."""
    for file_name in ("cifar10h-probs.npy", "cifar10h-counts.npy"):
        path = source / file_name
        if path.is_file():
            break
    else:
        raise FileNotFoundError(
            f"{source}: neither cifar10h-probs.npy nor cifar10h-counts.npy is there "
            "(CIFAR-10H: https://github.com/jcpeterson/cifar-10h)."
        )
    values = np.load(path).astype(np.float64)
    if values.ndim != 2 or values.shape[1] != 10:
        raise CifarFormatError(f"{path}: expected an (N, 10) array, got shape {values.shape}.")
    if values.shape[0] != num_images:
        raise CifarFormatError(
            f"{path}: {values.shape[0]} rows but the CIFAR-10 test batch has {num_images} images; "
            "the two files must describe the same images in the same order."
        )
    totals = values.sum(axis=1)
    bad = np.flatnonzero((values < 0).any(axis=1) | (totals <= 0))
    if bad.size:
        raise CifarFormatError(
            f"{path}, row {int(bad[0])}: human label counts/probabilities must be non-negative "
            "with a positive sum."
        )
    return values / totals[:, None]


# ----------------------------------------------------------------------------- sources


def resolve_source(source: str | Path | None, builder: str) -> Path:
    """The source path: as given if it exists (absolute, or relative to the working
    directory), else relative to the repository root, as the harness reads config paths."""
    if source is None or str(source) == "":
        raise ValueError(
            f"dataset builder {builder!r} needs a source: pass --source PATH "
            "(or dataset.builder_args.source=PATH)."
        )
    path = Path(source).expanduser()
    if path.exists():
        return path
    repo_relative = Path(__file__).resolve().parents[1] / path
    if not path.is_absolute() and repo_relative.exists():
        return repo_relative
    tried = str(path) if path.is_absolute() else f"{path.resolve()} or {repo_relative}"
    raise FileNotFoundError(f"dataset builder {builder!r}: source {source} not found (tried {tried}).")


class _BinarySource:
    """Named files of a CIFAR download: a folder, its parent, or the .tar.gz archive."""

    def __init__(self, source: Path, folder: str, names: Sequence[str], builder: str):
        self.source = source
        self.folder = folder
        self.names = tuple(names)
        self.archive: Path | None = None
        self.directory: Path | None = None
        if source.is_file() and tarfile.is_tarfile(source):
            self.archive = source
        elif all((source / n).is_file() for n in names):
            self.directory = source
        elif all((source / folder / n).is_file() for n in names):
            self.directory = source / folder
        else:
            raise FileNotFoundError(
                f"{source}: no {builder} binary files there; expected {', '.join(names)} in "
                f"that folder, in {source / folder}, or a .tar.gz archive of {folder}/ "
                "(the 'binary version' from https://www.cs.toronto.edu/~kriz/cifar.html)."
            )

    def read(self, name: str) -> tuple[bytes, str]:
        """Bytes of file ``name`` and a display name for errors."""
        if self.directory is not None:
            path = self.directory / name
            return path.read_bytes(), str(path)
        assert self.archive is not None
        with tarfile.open(self.archive) as archive:
            for member in archive.getmembers():
                if member.isfile() and Path(member.name).name == name:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    return handle.read(), f"{self.archive}:{member.name}"
        raise FileNotFoundError(f"{self.archive}: the archive has no member named {name!r}.")

    def fingerprint(self) -> dict[str, list[int]]:
        """Sizes and modification times of the source files (a change triggers a rebuild)."""
        if self.archive is not None:
            return _fingerprint([self.archive])
        assert self.directory is not None  # one of the two is set by __init__
        return _fingerprint([self.directory / n for n in self.names])


def _fingerprint(paths: Sequence[Path]) -> dict[str, list[int]]:
    """{path: [size, mtime_ns]}: cheap evidence that the source files did not change."""
    return {str(p.resolve()): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}


# ----------------------------------------------------------------------------- writers


def write_images(root: Path, files: Sequence[str], images: np.ndarray) -> None:
    """Save each (32, 32, 3) uint8 image as a PNG at ``root / file``."""
    for directory in {str(Path(f).parent) for f in files}:
        (root / directory).mkdir(parents=True, exist_ok=True)
    for file, image in zip(files, images, strict=True):
        Image.fromarray(image).save(root / file, compress_level=1)


def split_file_names(split: str, labels: np.ndarray, indices: np.ndarray) -> list[str]:
    """``<split>/<label>/<index:05d>.png`` for each sample (index into the source)."""
    return [f"{split}/{int(y)}/{int(i):05d}.png" for y, i in zip(labels, indices)]


def write_split(
    root: Path, split: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
) -> list[str]:
    """Write a split's PNG files and its ``<split>_ground_truth.json``; returns the files."""
    files = split_file_names(split, labels, indices)
    write_images(root, files, images)
    write_manifest(root / f"{split}_ground_truth.json", files, labels)
    return files


def _derived_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (independent streams per split and expert)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ----------------------------------------------------------------------------- idempotence


def _check_common(builder: str, num_experts: int, limit: int | None) -> None:
    if int(num_experts) < 1:
        raise ValueError(f"{builder}: num_experts must be at least 1, got {num_experts}.")
    if limit is not None and int(limit) < 2:
        raise ValueError(f"{builder}: limit must be at least 2 images (or null), got {limit}.")


# ----------------------------------------------------------------------------- CIFAR-10H


def build_cifar10h(
    root: str | Path,
    source: str | Path | None = None,
    seed: int = 0,
    num_experts: int = NUM_EXPERTS,
    test_fraction: float = TEST_FRACTION,
    limit: int | None = None,
    **unknown,
) -> Path:
    """CIFAR-10 test images + CIFAR-10H experts under ``root`` (see the module docstring).

    ``source`` holds ``test_batch.bin`` and ``cifar10h-probs.npy`` (or ``-counts.npy``);
    ``limit`` keeps only the first N images (fast tests).
    """
    check_unknown_options("cifar10h", unknown)
    _check_common("cifar10h", num_experts, limit)
    source = resolve_source(source, "cifar10h")
    batch_path = source / CIFAR10_TEST_FILE
    if not batch_path.is_file():
        raise FileNotFoundError(
            f"{source}: no {CIFAR10_TEST_FILE} there; the cifar10h source folder needs the "
            "CIFAR-10 test batch (binary version) and cifar10h-probs.npy or -counts.npy."
        )
    human_files = [source / n for n in ("cifar10h-probs.npy", "cifar10h-counts.npy")]
    identity = {
        "builder": "cifar10h",
        "version": VERSION,
        "options": {
            "seed": int(seed),
            "num_experts": int(num_experts),
            "test_fraction": float(test_fraction),
            "limit": None if limit is None else int(limit),
        },
        "source": _fingerprint([batch_path, *[p for p in human_files if p.is_file()][:1]]),
    }

    def write(root: Path) -> dict:
        data = read_cifar10(batch_path)
        probs = read_human_labels(source, len(data))
        count = len(data) if limit is None else min(int(limit), len(data))
        images, labels, probs = data.images[:count], data.labels[:count], probs[:count]
        train_rows, test_rows = stratified_split(labels, float(test_fraction), int(seed))
        summary: dict[str, Any] = {"splits": {}, "human_accuracy": {}, "expert_accuracy": {}}
        for split_index, (split, rows) in enumerate((("train", train_rows), ("test", test_rows))):
            files = write_split(root, split, images[rows], labels[rows], rows)
            write_manifest(root / f"{split}_human_probs.json", files, np.round(probs[rows], 6))
            accuracies = []
            for j in range(int(num_experts)):
                expert = sample_from_distribution(
                    probs[rows], seed=_derived_seed(seed, split_index, j)
                )
                write_manifest(root / f"{split}_expert_{j}.json", files, expert)
                accuracies.append(round(float((expert == labels[rows]).mean()), 4))
            summary["splits"][split] = len(rows)
            summary["human_accuracy"][split] = round(
                float(probs[rows, labels[rows]].mean()), 4
            )
            summary["expert_accuracy"][split] = accuracies
        summary["note"] = (
            "human_accuracy: mean CIFAR-10H probability of the official label; each expert "
            "samples one label per image from the human distribution."
        )
        return summary

    return materialise(Path(root), identity, write, cleanup=("train", "test"))


# ----------------------------------------------------------------------------- CIFAR-10/100


def contiguous_groups(num_groups: int, num_experts: int) -> list[list[int]]:
    """Split ``range(num_groups)`` into ``num_experts`` contiguous, near-equal ranges."""
    if not 1 <= num_experts <= num_groups:
        raise ValueError(f"num_experts must be in [1, {num_groups}], got {num_experts}.")
    return [chunk.tolist() for chunk in np.array_split(np.arange(num_groups), num_experts)]


def _write_specialists(
    root: Path,
    split: str,
    split_index: int,
    files: Sequence[str],
    labels: np.ndarray,
    groups: np.ndarray,
    expert_groups: Sequence[Sequence[int]],
    num_classes: int,
    p_in: float,
    p_out: float,
    seed: int,
) -> list[float]:
    """One class-specialist manifest per expert; returns each expert's accuracy."""
    accuracies = []
    for j, expert_range in enumerate(expert_groups):
        classes = np.unique(labels[np.isin(groups, expert_range)]).tolist()
        expert = class_specialist_labels(
            labels, classes, p_in, p_out, num_classes, seed=_derived_seed(seed, split_index, j)
        )
        write_manifest(root / f"{split}_expert_{j}.json", files, expert)
        accuracies.append(round(float((expert == labels).mean()), 4))
    return accuracies


def _build_official(
    builder: str,
    root: Path,
    source: str | Path | None,
    folder: str,
    split_files: dict[str, Sequence[str]],
    parse: Callable[[bytes, str], CifarImages],
    num_classes: int,
    num_groups: int,
    seed: int,
    num_experts: int,
    p_in: float,
    p_out: float,
    limit: int | None,
) -> Path:
    """Shared body of the cifar10 / cifar100 builders."""
    _check_common(builder, num_experts, limit)
    expert_groups = contiguous_groups(num_groups, int(num_experts))
    names = [n for files in split_files.values() for n in files]
    binaries = _BinarySource(resolve_source(source, builder), folder, names, builder)
    identity = {
        "builder": builder,
        "version": VERSION,
        "options": {
            "seed": int(seed),
            "num_experts": int(num_experts),
            "p_in": float(p_in),
            "p_out": float(p_out),
            "limit": None if limit is None else int(limit),
        },
        "source": binaries.fingerprint(),
    }

    def write(root: Path) -> dict:
        summary: dict[str, Any] = {"splits": {}, "expert_groups": expert_groups, "expert_accuracy": {}}
        for split_index, (split, file_names) in enumerate(split_files.items()):
            data = concatenate([parse(*binaries.read(name)) for name in file_names])
            count = len(data) if limit is None else min(int(limit), len(data))
            rows = np.arange(count)
            labels = data.labels[:count]
            groups = labels if data.coarse_labels is None else data.coarse_labels[:count]
            files = write_split(root, split, data.images[:count], labels, rows)
            summary["splits"][split] = count
            summary["expert_accuracy"][split] = _write_specialists(
                root, split, split_index, files, labels, groups, expert_groups,
                num_classes, float(p_in), float(p_out), int(seed),
            )
        return summary

    return materialise(Path(root), identity, write, cleanup=tuple(split_files))


def build_cifar10(
    root: str | Path,
    source: str | Path | None = None,
    seed: int = 0,
    num_experts: int = NUM_EXPERTS,
    p_in: float = P_IN,
    p_out: float = P_OUT,
    limit: int | None = None,
    **unknown,
) -> Path:
    """CIFAR-10 (official 50k/10k split) with specialists over contiguous class ranges.

    ``source``: the ``cifar-10-batches-bin`` folder, its parent, or the .tar.gz download;
    ``limit`` keeps the first N images of each split.
    """
    check_unknown_options("cifar10", unknown)
    return _build_official(
        "cifar10", Path(root), source, "cifar-10-batches-bin",
        {"train": CIFAR10_TRAIN_FILES, "test": (CIFAR10_TEST_FILE,)}, parse_cifar10,
        num_classes=10, num_groups=10, seed=seed, num_experts=num_experts,
        p_in=p_in, p_out=p_out, limit=limit,
    )


def build_cifar100(
    root: str | Path,
    source: str | Path | None = None,
    seed: int = 0,
    num_experts: int = NUM_EXPERTS,
    p_in: float = P_IN,
    p_out: float = P_OUT,
    limit: int | None = None,
    **unknown,
) -> Path:
    """CIFAR-100 (100 fine classes, official split) with super-class specialist experts.

    ``source``: the ``cifar-100-binary`` folder, its parent, or the .tar.gz download;
    ``limit`` keeps the first N images of each split.
    """
    check_unknown_options("cifar100", unknown)
    return _build_official(
        "cifar100", Path(root), source, "cifar-100-binary",
        {"train": (CIFAR100_TRAIN_FILE,), "test": (CIFAR100_TEST_FILE,)}, parse_cifar100,
        num_classes=100, num_groups=NUM_COARSE, seed=seed, num_experts=num_experts,
        p_in=p_in, p_out=p_out, limit=limit,
    )
