"""Tests for datasets/cifar.py: binary readers, the CIFAR-10/100 builders on tiny synthetic
downloads, and the CIFAR-10H builder and preset on a slice of the shared real data."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import cifar
from datasets.builders import BUILDERS
from datasets.generators import write_missing_manifests
from datasets.layout import load_split
from datasets.manifest import read_manifest
from datasets.materialise import STAMP

REPO = Path(__file__).resolve().parents[1]
CIFAR10H_SOURCE = (REPO / "../shared/data/cifar10h").resolve()
CIFAR10H_LIMIT = 2000  # 3 experts x 2000 images: sd of an accuracy ~0.005, well inside 0.02


# ----------------------------------------------------------------------------- helpers


def random_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def planes(image: np.ndarray) -> bytes:
    """The official pixel layout: 1,024 R, then G, then B bytes, each plane row-major."""
    return b"".join(image[:, :, channel].tobytes(order="C") for channel in range(3))


def cifar10_bytes(images: np.ndarray, labels) -> bytes:
    return b"".join(bytes([int(y)]) + planes(x) for x, y in zip(images, labels))


def cifar100_bytes(images: np.ndarray, coarse, fine) -> bytes:
    return b"".join(bytes([int(c), int(f)]) + planes(x) for x, c, f in zip(images, coarse, fine))


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------- readers


def test_cifar10_reader_round_trips_labels_and_planes(tmp_path):
    images = random_images(3, seed=0)
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(cifar10_bytes(images, [0, 9, 4]))
    batch = cifar.read_cifar10(path)
    assert batch.images.shape == (3, 32, 32, 3) and batch.images.dtype == np.uint8
    np.testing.assert_array_equal(batch.images, images)
    np.testing.assert_array_equal(batch.labels, [0, 9, 4])
    assert batch.coarse_labels is None


def test_cifar10_reader_pixel_addressing(tmp_path):
    # byte 1 + c*1024 + row*32 + col of a record is channel c at (row, col)
    record = bytearray(cifar.CIFAR10_RECORD_BYTES)
    record[0] = 7
    record[1 + 0 * 1024 + 2 * 32 + 5] = 11  # red at row 2, col 5
    record[1 + 1 * 1024 + 31 * 32 + 0] = 22  # green at row 31, col 0
    record[1 + 2 * 1024 + 0 * 32 + 31] = 33  # blue at row 0, col 31
    path = tmp_path / "one.bin"
    path.write_bytes(bytes(record))
    image = cifar.read_cifar10(path).images[0]
    assert (image[2, 5, 0], image[31, 0, 1], image[0, 31, 2]) == (11, 22, 33)
    assert int(image.sum()) == 11 + 22 + 33


def test_cifar100_reader_round_trips_coarse_and_fine(tmp_path):
    images = random_images(4, seed=1)
    path = tmp_path / "train.bin"
    path.write_bytes(cifar100_bytes(images, [3, 19, 0, 7], [15, 99, 0, 42]))
    batch = cifar.read_cifar100(path)
    np.testing.assert_array_equal(batch.images, images)
    np.testing.assert_array_equal(batch.coarse_labels, [3, 19, 0, 7])
    np.testing.assert_array_equal(batch.labels, [15, 99, 0, 42])


@pytest.mark.parametrize("reader, record", [(cifar.read_cifar10, 3073), (cifar.read_cifar100, 3074)])
def test_truncated_file_raises_with_its_name(tmp_path, reader, record):
    path = tmp_path / "truncated_batch.bin"
    path.write_bytes(bytes(2 * record - 5))
    with pytest.raises(cifar.CifarFormatError, match="truncated_batch.bin.*not a multiple"):
        reader(path)


def test_empty_file_and_out_of_range_label_raise(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(cifar.CifarFormatError, match="empty.bin"):
        cifar.read_cifar10(empty)
    bad = tmp_path / "bad_label.bin"
    bad.write_bytes(cifar10_bytes(random_images(2, seed=2), [1, 12]))
    with pytest.raises(cifar.CifarFormatError, match=r"bad_label.bin, record 1: label 12"):
        cifar.read_cifar10(bad)


# ----------------------------------------------------------------------------- CIFAR-10 / 100 builders


def write_cifar10_folder(parent: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    folder = parent / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    train_images, train_labels = [], []
    for i, name in enumerate(cifar.CIFAR10_TRAIN_FILES):
        images, labels = random_images(per_batch, seed=10 + i), (np.arange(per_batch) + i) % 10
        (folder / name).write_bytes(cifar10_bytes(images, labels))
        train_images.append(images)
        train_labels.append(labels)
    test_images, test_labels = random_images(per_batch, seed=20), np.arange(per_batch) % 10
    (folder / cifar.CIFAR10_TEST_FILE).write_bytes(cifar10_bytes(test_images, test_labels))
    return {
        "train_images": np.concatenate(train_images), "train_labels": np.concatenate(train_labels),
        "test_images": test_images, "test_labels": test_labels,
    }


def test_cifar10_builder_writes_pngs_manifests_and_is_idempotent(tmp_path):
    truth = write_cifar10_folder(tmp_path / "download")
    root = BUILDERS.get("cifar10")(tmp_path / "cifar10", source=tmp_path / "download")
    for split in ("train", "test"):
        data = load_split(root, f"{split}_ground_truth.json",
                          [f"{split}_expert_{j}.json" for j in range(3)], 10, require_complete=True)
        np.testing.assert_array_equal(data.y, truth[f"{split}_labels"])
        for row, file in enumerate(data.files):
            np.testing.assert_array_equal(png_pixels(root / file), truth[f"{split}_images"][row])
    assert len(read_manifest(root / "train_ground_truth.json", 10).files) == 20

    stamp = root / STAMP
    before = stamp.stat().st_mtime_ns
    BUILDERS.get("cifar10")(root, source=tmp_path / "download")
    assert stamp.stat().st_mtime_ns == before, "an up-to-date dataset must not be rewritten"

    (root / "missing" / "rate_0.3").mkdir(parents=True)  # derived manifests of the old build
    BUILDERS.get("cifar10")(root, source=tmp_path / "download", seed=1)
    assert json.loads(stamp.read_text())["identity"]["options"]["seed"] == 1
    assert not (root / "missing").exists(), "a rebuild must drop stale derived manifests"


def test_cifar100_builder_from_archive_uses_super_class_specialists(tmp_path):
    count = 60
    coarse = np.arange(count) % 20
    fine = coarse * 5 + (np.arange(count) // 20) % 5  # every fine class has one super-class
    blob = cifar100_bytes(random_images(count, seed=3), coarse, fine)
    archive = tmp_path / "cifar-100-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("train.bin", "test.bin"):
            info = tarfile.TarInfo(f"cifar-100-binary/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    root = BUILDERS.get("cifar100")(tmp_path / "c100", source=archive, p_in=1.0, p_out=0.0)
    stamp = json.loads((root / STAMP).read_text())
    groups = stamp["expert_groups"]
    assert groups == [list(range(0, 7)), list(range(7, 14)), list(range(14, 20))]
    for split in ("train", "test"):
        data = load_split(root, f"{split}_ground_truth.json",
                          [f"{split}_expert_{j}.json" for j in range(3)], 100)
        np.testing.assert_array_equal(data.y, fine)
        for j, group in enumerate(groups):
            correct = data.t[:, j] == data.y
            np.testing.assert_array_equal(correct, np.isin(coarse, group))


def test_builders_reject_unknown_options_and_missing_source(tmp_path):
    with pytest.raises(ValueError, match="no option.*num_expert"):
        BUILDERS.get("cifar100")(tmp_path / "x", source=tmp_path, num_expert=2)
    with pytest.raises(FileNotFoundError, match="no cifar10 binary files"):
        BUILDERS.get("cifar10")(tmp_path / "x", source=tmp_path)
    with pytest.raises(ValueError, match="needs a source"):
        BUILDERS.get("cifar10h")(tmp_path / "x")


# ----------------------------------------------------------------------------- CIFAR-10H (real data)


needs_cifar10h = pytest.mark.skipif(
    not (CIFAR10H_SOURCE / "test_batch.bin").is_file(),
    reason=f"CIFAR-10H shared data not found at {CIFAR10H_SOURCE} (../shared/data/cifar10h "
    "relative to the repository; present on the development machines, absent on a user's)",
)


@pytest.fixture(scope="module")
def cifar10h_root(tmp_path_factory):
    """The first CIFAR10H_LIMIT images of the shared data, built once for this module."""
    if not (CIFAR10H_SOURCE / "test_batch.bin").is_file():
        pytest.skip(f"CIFAR-10H shared data not found at {CIFAR10H_SOURCE}")
    root = tmp_path_factory.mktemp("cifar10h")
    return BUILDERS.get("cifar10h")(root, source=CIFAR10H_SOURCE, limit=CIFAR10H_LIMIT)


@needs_cifar10h
def test_cifar10h_split_sizes_and_stratification(cifar10h_root):
    train = load_split(cifar10h_root, "train_ground_truth.json",
                       [f"train_expert_{j}.json" for j in range(3)], 10)
    test = load_split(cifar10h_root, "test_ground_truth.json",
                      [f"test_expert_{j}.json" for j in range(3)], 10, require_complete=True)
    assert (len(train), len(test)) == (1600, 400)
    assert not set(train.files) & set(test.files)
    counts_all = np.bincount(np.concatenate([train.y, test.y]), minlength=10)
    np.testing.assert_allclose(np.bincount(test.y, minlength=10), 0.2 * counts_all, atol=1.0)
    stamp = json.loads((cifar10h_root / STAMP).read_text())
    assert stamp["splits"] == {"train": 1600, "test": 400}


@needs_cifar10h
def test_cifar10h_experts_match_human_accuracy(cifar10h_root):
    reference = cifar.read_cifar10(CIFAR10H_SOURCE / "test_batch.bin")
    probs = cifar.read_human_labels(CIFAR10H_SOURCE, len(reference))[:CIFAR10H_LIMIT]
    labels = reference.labels[:CIFAR10H_LIMIT]
    human = float(probs[np.arange(CIFAR10H_LIMIT), labels].mean())
    index_of = lambda file: int(Path(file).stem)  # noqa: E731  file = <split>/<label>/<index>.png
    for j in range(3):
        correct = 0
        for split in ("train", "test"):
            expert = read_manifest(cifar10h_root / f"{split}_expert_{j}.json", 10)
            rows = np.array([index_of(f) for f in expert.files])
            correct += int((expert.labels == labels[rows]).sum())
        accuracy = correct / CIFAR10H_LIMIT
        assert abs(accuracy - human) < 0.02, (j, accuracy, human)
    soft = read_manifest(cifar10h_root / "train_human_probs.json", 10)
    assert soft.is_soft and soft.labels.shape == (1600, 10)


@needs_cifar10h
def test_cifar10h_missing_manifests_are_nested(cifar10h_root, tmp_path):
    truth = read_manifest(cifar10h_root / "train_ground_truth.json", 10)
    experts = [read_manifest(cifar10h_root / f"train_expert_{j}.json", 10) for j in range(3)]
    kept = {}
    for rate in (0.3, 0.5):
        paths = [tmp_path / f"rate_{rate}" / f"expert_{j}.json" for j in range(3)]
        write_missing_manifests(experts, truth.files, rate, seed=0, out_paths=paths)
        kept[rate] = [set(read_manifest(p, 10).files) for p in paths]
    for j in range(3):
        assert kept[0.5][j] <= kept[0.3][j], "annotations kept at 0.5 must be kept at 0.3"
        assert abs(len(kept[0.3][j]) / len(truth.files) - 0.7) < 0.05


@needs_cifar10h
def test_cifar10h_builder_is_idempotent(cifar10h_root):
    stamp = cifar10h_root / STAMP
    before = stamp.stat().st_mtime_ns
    BUILDERS.get("cifar10h")(cifar10h_root, source=CIFAR10H_SOURCE, limit=CIFAR10H_LIMIT)
    assert stamp.stat().st_mtime_ns == before


@needs_cifar10h
def test_cifar10h_preset_composes_and_validates(cifar10h_root, tmp_path):
    from hydra import compose, initialize_config_dir

    from benchmark.config import dataset_of, to_cell
    from benchmark.data import dataset_files

    overrides = ["dataset=cifar10h", "experiment=single", f"dataset.root={cifar10h_root}",
                 f"dataset.builder_args.limit={CIFAR10H_LIMIT}", "dataset.missing_seed=0"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    assert cfg.dataset.builder == "cifar10h" and cfg.dataset.num_classes == 10
    assert cfg.dataset.builder_args.source == "../shared/data/cifar10h"
    # the preset's builder_args (relative source, limit) reach the same data: no rebuild
    stamp = cifar10h_root / STAMP
    before = stamp.stat().st_mtime_ns
    BUILDERS.get(cfg.dataset.builder)(cifar10h_root, **cfg.dataset.builder_args)
    assert stamp.stat().st_mtime_ns == before
    dataset = dataset_of(to_cell(cfg), REPO)
    files = dataset_files(dataset, 0.3, tmp_path / "cache")  # derives missing manifests
    train = load_split(files.root, files.train_ground_truth, files.train_experts, files.num_classes)
    test = load_split(files.root, files.test_ground_truth, files.test_experts, files.num_classes,
                      require_complete=True)
    assert train.num_experts == test.num_experts == 3
    assert 0.6 < float((train.t >= 0).mean()) < 0.8  # 30% of annotations missing
