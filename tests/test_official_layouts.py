"""The official Prob-L2D Chaoyang folder, as published, read by ``dataset=chaoyang``.

The fixture writes manifests of the published shape (4,103 training and 2,057 test images,
pathologists A, B and C, the published draws at missing rates 0.3, 0.5 and 0.7 keeping
2,872, 2,051 and 1,230 annotations per pathologist) over small placeholder JPEG images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.config import DatasetConfig, dataset_of
from benchmark.data import dataset_files
from core.records import load_records
from datasets.layout import load_split
from tests.conftest import REPO_ROOT
from tests.test_pipeline import compose_cfg, flat, run_cli

NUM_TRAIN, NUM_TEST, NUM_CLASSES = 4103, 2057, 4
PUBLISHED_KEPT = {0.3: 2872, 0.5: 2051, 0.7: 1230}
PATHOLOGISTS = "ABC"


def write_official_chaoyang(root: Path) -> Path:
    """Placeholder 12x12 JPEGs (class = brightness band) and the official manifest files."""
    rng = np.random.default_rng(0)
    folder = root / "annotations_3"
    folder.mkdir(parents=True)
    for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        labels = rng.integers(0, NUM_CLASSES, count)
        files = [f"{split}/{i:05d}.JPG" for i in range(count)]
        (root / split).mkdir()
        for file, label in zip(files, labels):
            pixels = rng.integers(0, 40, (12, 12, 3)) + 50 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / file, format="JPEG")
        records = [{"file": f, "label": int(y)} for f, y in zip(files, labels)]
        (folder / f"{split}.json").write_text(json.dumps(records))
        for expert in PATHOLOGISTS:
            noisy = np.where(rng.random(count) < 0.8, labels, rng.integers(0, NUM_CLASSES, count))
            annotations = [{"file": f, "label": int(y)} for f, y in zip(files, noisy)]
            (folder / f"label_{expert}_{split}.json").write_text(json.dumps(annotations))
            if split == "train":
                for rate, kept in PUBLISHED_KEPT.items():
                    rows = np.sort(rng.permutation(count)[:kept])
                    published = [annotations[i] for i in rows]
                    (folder / f"label_{expert}_train_{rate:g}.json").write_text(json.dumps(published))
    return root


@pytest.fixture(scope="module")
def chaoyang_root(tmp_path_factory) -> Path:
    return write_official_chaoyang(tmp_path_factory.mktemp("chaoyang"))


def chaoyang(root: Path, *overrides: str) -> DatasetConfig:
    cfg, _ = compose_cfg(["dataset=chaoyang", f"dataset.root={root}", *overrides])
    return dataset_of(cfg, REPO_ROOT)


@pytest.mark.parametrize("rate", sorted(PUBLISHED_KEPT))
def test_published_missing_rates_are_read_as_published(chaoyang_root, tmp_path, rate):
    files = dataset_files(chaoyang(chaoyang_root), rate, tmp_path / "cache")
    assert files.missing_source == "published"
    assert files.train_experts == (f"annotations_3/label_A_train_{rate:g}.json",
                                   f"annotations_3/label_B_train_{rate:g}.json")
    split = load_split(files.root, files.train_ground_truth, files.train_experts, NUM_CLASSES,
                       check_files=False)
    assert len(split) == NUM_TRAIN and split.num_experts == 2  # A and B, as the official configs
    assert list((split.t != -1).sum(axis=0)) == [PUBLISHED_KEPT[rate]] * 2
    assert not (tmp_path / "cache").exists()  # nothing drawn


def test_another_rate_is_drawn_from_the_complete_files(chaoyang_root, tmp_path):
    files = dataset_files(chaoyang(chaoyang_root, "dataset.missing_seed=0"), 0.4, tmp_path / "cache")
    assert files.missing_source == "drawn"
    assert files.complete_experts == ("annotations_3/label_A_train.json",
                                      "annotations_3/label_B_train.json")


def test_an_unseeded_draw_is_refused_before_anything_is_cached(chaoyang_root, tmp_path):
    # RunConfig.build resolves a null missing_seed from the run seed; a direct call must not
    # cache a draw nobody can reproduce
    with pytest.raises(ValueError, match="needs dataset.missing_seed"):
        dataset_files(chaoyang(chaoyang_root), 0.4, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_drawn_rate_on_already_missing_annotations_is_refused(chaoyang_root, tmp_path):
    dataset = chaoyang(chaoyang_root, "dataset.train.experts=[label_A_train_0.5.json,label_B_train_0.5.json]",
                       "dataset.published_missing=null")
    with pytest.raises(ValueError, match="would drop annotations a second time: "
                       "annotations_3/label_A_train_0.5.json already annotates only 2051 of 4103"):
        dataset_files(dataset, 0.3, tmp_path / "cache")


def test_official_preprocessing_resizes_crops_and_scales(chaoyang_root):
    from datasets.source import crop_batch

    dataset = chaoyang(chaoyang_root)
    assert dataset.image_shape == (256, 256, 3) and dataset.crop == 224
    assert dataset.task_spec().input_shape == (224, 224, 3)
    assert dataset.mean == [0.0, 0.0, 0.0] and dataset.std == [1.0, 1.0, 1.0]  # pixels / 255
    images = np.arange(2 * 6 * 6 * 1).reshape(2, 6, 6, 1)
    np.testing.assert_array_equal(crop_batch(images, 4, None), images[:, 1:5, 1:5])  # centre
    random = crop_batch(images, 4, np.random.default_rng(0))
    assert random.shape == (2, 4, 4, 1)
    assert any(np.array_equal(random[0], images[0, r:r + 4, c:c + 4]) for r in range(3) for c in range(3))


def test_a_run_on_the_official_layout_records_the_published_rate(chaoyang_root, tmp_path):
    result = run_cli("experiment=single", "method=prob_l2d", "dataset=chaoyang",
                     f"dataset.root={chaoyang_root}", "missing_rate=0.5",
                     "dataset.image.height=12", "dataset.image.width=12", "dataset.crop=8",
                     "dataset.backbone=small_cnn", "train.epochs=1", "tracking=none",
                     f"output_dir={tmp_path}")
    assert result.returncode == 0, flat(result.stderr)[-2000:]
    (record,) = load_records(tmp_path / "runs/single")
    assert record["cell"]["missing_rate"] == 0.5
    assert record["agents"] == ["expert_0", "expert_1", "classifier"]  # pathologists A and B
    assert record["missing_annotations"]["source"] == "published"
    assert 0.0 <= record["run_metrics"]["imputation_accuracy"] <= 1.0
