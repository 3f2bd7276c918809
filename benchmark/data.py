"""A cell's data: manifests resolved (missing-annotation manifests derived), validated, decoded.

A dataset with a ``builder`` is materialised on first use when its root lies below the
repository's ``data/`` folder; a root elsewhere is the user's and is only read. Everything
the harness derives (missing-annotation manifests, decoded images) lives in its own cache
(``data_cache_dir``, under ``outputs/`` by default), keyed by the content it derives from.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.config import ConfigError, DatasetConfig
from benchmark.provenance import REPO_ROOT, file_sha256
from core.labels import stable_hash
from datasets.builders import BUILDERS
from datasets.generators import stratified_split, write_missing_manifests
from datasets.layout import check_expert_counts, inside, load_split
from datasets.manifest import ManifestError, read_manifest
from datasets.source import ImageFormat, StreamedSplit, decode_all, stream_split

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
    source_experts: tuple[str, ...]  # the configured expert manifests (before any drop)
    missing_source: str = "none"  # "none", "published" (the dataset's own files) or "drawn"


@dataclasses.dataclass(frozen=True)
class CellData:
    """Everything a cell needs from the dataset: splits decoded in memory (``ArraySplit``)
    or, for large data or ``dataset.cache=false``, streamed from disk (``StreamedSplit``).

    ``validation`` is held out of the training split (never trained on); its ``t`` holds
    the experts' complete labels where known (the answers they would give when deferred
    to), else the observed ones (a missing one counts as a wrong answer).
    """

    files: DatasetFiles
    train: Any  # datasets.source.ArraySplit or StreamedSplit
    test: Any
    train_complete_t: np.ndarray | None
    manifests: dict[str, Path]
    validation: Any = None  # as ``train``, or None with validation_fraction 0
    image_digests: dict[str, str] | None = None  # content hash of the train and test images

    @property
    def streamed(self) -> bool:
        """Whether the images stay on disk and are decoded per batch (augmentation then
        draws its randomness per sample, so trained models differ from in-memory ones)."""
        return isinstance(self.train, StreamedSplit)


def hold_out_validation(data: CellData, fraction: float, seed: int) -> CellData:
    """Split a seeded, class-stratified ``fraction`` of the training split off as validation."""
    if fraction <= 0.0:
        return data
    keep, held = stratified_split(np.asarray(data.train.y), fraction, seed)
    complete = data.train_complete_t
    return dataclasses.replace(
        data,
        train=data.train.subset(keep),
        train_complete_t=None if complete is None else complete[keep],
        validation=data.train.subset(held, t=complete),
    )


def hold_out_experts(data: CellData, experts: list[int], context: int, seed: int) -> CellData:
    """The training split with the annotations of the held-out ``experts`` withheld (set
    missing) except ``context`` of each, drawn at random by ``seed``: a new expert known by a
    few answers, whom every method may use as it uses any annotation (a population method as
    the expert's context set). Test and validation answers stay as they are."""
    if not experts:
        return data
    t = np.array(data.train.t, copy=True)
    rng = np.random.default_rng([seed, *experts])
    for j in experts:
        observed = np.flatnonzero(t[:, j] != -1)
        kept = rng.choice(observed, size=min(context, len(observed)), replace=False)
        t[np.setdiff1d(observed, kept), j] = -1
    return dataclasses.replace(data, train=dataclasses.replace(data.train, t=t))


def _is_managed(root: Path) -> bool:
    try:
        root.resolve().relative_to(MANAGED_DATA_DIR.resolve())
    except ValueError:
        return False
    return True


def root_of(dataset: DatasetConfig) -> Path:
    """The dataset's root as a ``Path`` (``benchmark.config.dataset_of`` resolved it)."""
    return Path(dataset.root)


def _check_inside(dataset: DatasetConfig, names: tuple[str, ...], option: str) -> None:
    root = root_of(dataset)
    real_root = root.resolve()
    for name in names:
        if not inside(real_root, root / name):
            raise ManifestError(
                f"{root / name}: manifest ({option}) resolves to "
                f"{(root / name).resolve()}, outside the dataset root {real_root}; "
                "manifests must lie inside the root (symbolic links included)."
            )


def locate(dataset: DatasetConfig, name: str) -> str:
    """``name`` relative to the root: in the first of ``dataset.manifest_dirs`` holding it
    (official layouts keep manifests under e.g. ``annotations_3/``); as given if none does."""
    for folder in dataset.manifest_dirs:
        candidate = name if folder in (".", "") else f"{folder}/{name}"
        if (root_of(dataset) / candidate).is_file():
            return candidate
    return name


def published_missing(dataset: DatasetConfig, rate: float) -> tuple[str, ...] | None:
    """The dataset's own manifests at missing ``rate`` (``published_missing`` pattern, e.g.
    ``label_A_train_0.5.json``), if it names them and every expert has one; else None."""
    if not dataset.published_missing:
        return None
    names = tuple(locate(dataset, dataset.published_missing.format(stem=Path(name).stem, rate=f"{rate:g}"))
                  for name in dataset.train.experts)
    _check_inside(dataset, names, "dataset.published_missing")
    return names if all((root_of(dataset) / name).is_file() for name in names) else None


def refuse_stacked_drop(dataset: DatasetConfig, rate: float) -> None:
    """A drawn missing rate needs complete expert manifests: dropping annotations from
    manifests that already miss some would stack two missing rates without a word."""
    split = load_split(dataset.root, dataset.train.ground_truth, dataset.train.experts,
                       dataset.num_classes, check_files=False)
    for j, name in enumerate(dataset.train.experts):
        annotated = int((split.t[:, j] != -1).sum())
        if annotated < len(split):
            raise ConfigError(
                f"missing_rate={rate:g} would drop annotations a second time: {name} already "
                f"annotates only {annotated} of {len(split)} training samples. Train on them as "
                "they are with missing_rate=0, point dataset.train.experts at complete "
                "manifests, or use the dataset's published files for this rate."
            )


def derive_missing_manifests(dataset: DatasetConfig, missing_rate: float, cache_dir: Path
                             ) -> tuple[str, ...]:
    """Absolute paths of the experts' manifests with annotations dropped at ``missing_rate``.

    Written once under ``cache_dir/missing/<key>/``, where the key hashes the content of the
    ground truth and of every source expert manifest with the rate and the seed, so an
    edited source derives a new file and nothing is ever written in the dataset root.
    ``dataset.missing_seed`` must be resolved (``RunConfig.build`` sets it from the run seed
    when the preset leaves it null): an unseeded draw cannot be cached.
    """
    if dataset.missing_seed is None:
        raise ValueError("derive_missing_manifests needs dataset.missing_seed (None would cache an "
                         "unreproducible draw); RunConfig.build resolves it from the run seed.")
    root, experts = root_of(dataset), dataset.train.experts
    sources = [root / dataset.train.ground_truth, *(root / name for name in experts)]
    key = stable_hash({"sources": [file_sha256(path) for path in sources],
                       "rate": missing_rate, "seed": dataset.missing_seed})
    folder = cache_dir / "missing" / key
    derived = tuple(str(folder / f"expert_{j}_{Path(name).name}") for j, name in enumerate(experts))
    if not all(Path(path).is_file() for path in derived):
        # the same checks as at missing rate 0 (e.g. an expert naming an unknown sample)
        load_split(root, dataset.train.ground_truth, experts, dataset.num_classes, check_files=False)
        gt = read_manifest(root / dataset.train.ground_truth, dataset.num_classes)
        manifests = [read_manifest(root / name, dataset.num_classes) for name in experts]
        write_missing_manifests(manifests, gt.files, missing_rate, dataset.missing_seed, derived)
    return derived


def dataset_files(dataset: DatasetConfig, missing_rate: float, cache_dir: Path) -> DatasetFiles:
    """Manifest paths of a cell; missing-annotation manifests are derived into ``cache_dir``."""
    if not 0.0 <= float(missing_rate) <= 1.0:
        raise ConfigError(f"missing_rate must be in [0, 1], got {missing_rate}.")
    root = root_of(dataset)
    if dataset.builder and _is_managed(root):
        BUILDERS.get(dataset.builder)(root, **dict(dataset.builder_args))
    if not root.is_dir():
        raise ManifestError(
            f"{root}: dataset root does not exist or is not a directory (dataset.root; "
            f"relative roots are resolved against {REPO_ROOT})."
        )
    def located(split):  # each manifest in the first of dataset.manifest_dirs holding it
        complete = split.complete_experts
        return dataclasses.replace(
            split, ground_truth=locate(dataset, split.ground_truth),
            experts=tuple(locate(dataset, name) for name in split.experts),
            complete_experts=None if complete is None else tuple(locate(dataset, n) for n in complete))

    dataset = dataclasses.replace(dataset, train=located(dataset.train), test=located(dataset.test))
    _check_inside(dataset, (dataset.train.ground_truth, dataset.test.ground_truth),
                  "dataset.train/test.ground_truth")
    _check_inside(dataset, (*dataset.train.experts, *dataset.test.experts), "dataset.train/test.experts")
    experts: tuple[str, ...] = tuple(dataset.train.experts)
    complete = None if dataset.train.complete_experts is None else tuple(dataset.train.complete_experts)
    source = "none"
    if missing_rate > 0:
        complete = complete or experts
        published = published_missing(dataset, float(missing_rate))
        if published is not None:
            experts, source = published, "published"
        else:
            refuse_stacked_drop(dataset, float(missing_rate))
            experts, source = derive_missing_manifests(dataset, float(missing_rate), cache_dir), "drawn"
    return DatasetFiles(
        name=dataset.name, root=root, num_classes=dataset.num_classes,
        train_ground_truth=dataset.train.ground_truth, train_experts=experts,
        complete_experts=complete, test_ground_truth=dataset.test.ground_truth,
        test_experts=tuple(dataset.test.experts), source_experts=tuple(dataset.train.experts),
        missing_source=source,
    )


def source_manifest_hashes(dataset: DatasetConfig, missing_rate: float) -> dict[str, str | None]:
    """sha256 of every manifest a cell reads (None where a file does not exist yet)."""
    names = (dataset.train.ground_truth, *dataset.train.experts, *(dataset.train.complete_experts or ()),
             dataset.test.ground_truth, *dataset.test.experts)
    names = tuple(locate(dataset, name) for name in names)
    if missing_rate > 0:
        names += published_missing(dataset, missing_rate) or ()
    root = root_of(dataset)
    return {name: file_sha256(root / name) if (root / name).is_file() else None for name in names}


def image_digest(root: Path, files: tuple[str, ...]) -> str:
    """Hash of every image's path and content (each file hashed once per process while its
    size and modification time stay the same): an edited image changes it."""
    return stable_hash([(file, file_sha256(root / file) if (root / file).is_file() else None)
                        for file in files])


def source_image_digests(dataset: DatasetConfig) -> dict[str, str | None]:
    """``image_digest`` of the train and test images a cell reads (None where a ground-truth
    manifest does not exist yet): part of every identity that derives from the images."""
    digests = {}
    for split, manifests in (("train", dataset.train), ("test", dataset.test)):
        path = root_of(dataset) / locate(dataset, manifests.ground_truth)
        digests[split] = (image_digest(root_of(dataset), read_manifest(path, dataset.num_classes).files)
                          if path.is_file() else None)
    return digests


def decoded_megabytes(num_images: int, image: tuple[int, int, int]) -> float:
    """Memory (MiB) of ``num_images`` decoded (H, W, C) uint8 images."""
    height, width, channels = image
    return num_images * height * width * channels / 2**20


@functools.lru_cache(maxsize=8)
def _decode(files: DatasetFiles, image: tuple[int, int, int], cache_dir: Path | None,
            digests: tuple[str, str], stream: bool, memory_limit_mb: float) -> CellData:
    """The cell's splits, decoded into memory unless ``stream`` or their decoded size
    exceeds ``memory_limit_mb`` (then both stream from disk); cached in ``cache_dir`` under
    the images' content ``digests`` (train, test)."""
    fmt = ImageFormat(*image)
    train = load_split(files.root, files.train_ground_truth, files.train_experts, files.num_classes)
    test = load_split(files.root, files.test_ground_truth, files.test_experts, files.num_classes,
                      require_complete=True)
    check_expert_counts(train, test, f"dataset {files.name!r}")
    used = int(max(np.max(train.y, initial=-1), np.max(test.y, initial=-1))) + 1
    if used < files.num_classes:
        raise ConfigError(
            f"dataset.num_classes={files.num_classes}, but the ground truth of {files.root} uses "
            f"classes 0..{used - 1} only; set dataset.num_classes={used} (a class that never "
            "occurs cannot be learned or scored).")
    absent = sorted(set(range(files.num_classes)) - set(np.unique(train.y).tolist()))
    if absent:
        print(f"[l2d-bench] warning: dataset {files.name!r}: class(es) {', '.join(map(str, absent))} "
              f"never occur in the training split ({files.root / files.train_ground_truth}); the "
              "classifier cannot learn them.", file=sys.stderr, flush=True)
    complete_t = None
    if files.complete_experts:
        complete_t = load_split(files.root, files.train_ground_truth, files.complete_experts,
                                files.num_classes, check_files=False).t
    manifests = {"train/ground_truth": files.root / files.train_ground_truth,
                 "test/ground_truth": files.root / files.test_ground_truth}
    for j, name in enumerate(files.train_experts):
        manifests[f"train/expert_{j}"] = files.root / name
        if files.source_experts[j] != name:  # derived: record its source too
            manifests[f"train/expert_{j}/source"] = files.root / files.source_experts[j]
    for j, name in enumerate(files.test_experts):
        manifests[f"test/expert_{j}"] = files.root / name
    image_digests = {"train": digests[0], "test": digests[1]}
    if stream or decoded_megabytes(len(train) + len(test), image) > memory_limit_mb:
        return CellData(files, stream_split(train, fmt), stream_split(test, fmt), complete_t,
                        manifests, image_digests=image_digests)
    train_images = decode_all(train, fmt, cache_dir, signature=digests[0])
    test_images = decode_all(test, fmt, cache_dir, signature=digests[1])
    return CellData(files, train_images, test_images, complete_t, manifests,
                    image_digests=image_digests)


_ERRORS: dict[tuple, Exception] = {}


def load_data(dataset: DatasetConfig, missing_rate: float, cache_dir: Path,
              validation: tuple[float, int] = (0.0, 0)) -> CellData:
    """Resolve, validate and decode a cell's data (memoised per process while the images'
    content is unchanged; errors too) and hold out ``validation`` = (fraction, seed) of the
    training split. Derived files go below ``cache_dir`` (decoded images only if
    ``dataset.cache``), never into the dataset root. The splits stream from disk instead
    of being decoded into memory when ``dataset.cache`` is false or their decoded images
    (train + test) would exceed ``dataset.memory_limit_mb``."""
    key = (dataset, missing_rate, cache_dir)
    if key in _ERRORS:
        raise _ERRORS[key]
    try:
        files = dataset_files(dataset, missing_rate, cache_dir)
        digests = tuple(
            image_digest(files.root, read_manifest(files.root / gt, files.num_classes).files)
            for gt in (files.train_ground_truth, files.test_ground_truth))
        images = cache_dir / "images" if dataset.cache else None
        data = _decode(files, dataset.image_shape, images, digests, not dataset.cache,
                       dataset.memory_limit_mb)
        data = hold_out_validation(data, *validation)
        return hold_out_experts(data, list(dataset.held_out_experts), dataset.held_out_context,
                                dataset.missing_seed or 0)
    except Exception as err:
        _ERRORS[key] = err
        raise
