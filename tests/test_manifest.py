"""Manifest parsing and every validation error (each message names the file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasets.layout import check_expert_counts, load_split
from datasets.manifest import ManifestError, read_manifest, write_manifest

TRAIN_EXPERTS = [f"train_expert_{j}.json" for j in range(3)]
TEST_EXPERTS = [f"test_expert_{j}.json" for j in range(3)]


def write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_hard_and_soft_labels_parse(tmp_path):
    hard = read_manifest(write(tmp_path / "h.json", [{"file": "a.png", "label": 2}]), 3)
    assert hard.labels.tolist() == [2] and not hard.is_soft
    soft = read_manifest(
        write(tmp_path / "s.json", [{"file": "a.png", "label": [0.2, 0.7, 0.1]},
                                    {"file": "b.png", "label": 0}]), 3)
    assert soft.is_soft
    np.testing.assert_allclose(soft.labels, [[0.2, 0.7, 0.1], [1, 0, 0]])
    assert soft.hard_labels().tolist() == [1, 0]


def test_write_then_read_round_trips(tmp_path):
    path = write_manifest(tmp_path / "m.json", ["x/1.png", "x/2.png"], [1, 0])
    assert read_manifest(path, 2).as_dict() == {"x/1.png": 1, "x/2.png": 0}


def test_duplicate_with_same_label_is_kept_once(tmp_path):
    manifest = read_manifest(
        write(tmp_path / "d.json", [{"file": "a.png", "label": 1}, {"file": "a.png", "label": 1}]), 2)
    assert manifest.files == ("a.png",)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read the manifest as JSON"),
        ({"file": "a.png", "label": 0}, "must be a JSON list"),
        ([{"file": "a.png"}], "record 0: each record must be an object with 'file' and 'label'"),
        ([{"label": 1}], "record 0: each record must be an object"),
        ([{"file": "a.png", "label": 0}, {"file": "b.png", "label": 3}], "record 1: label 3 is outside [0, 3)"),
        ([{"file": "a.png", "label": -1}], "label -1 is outside [0, 3)"),
        ([{"file": "a.png", "label": [0.5, 0.5]}], "soft label has 2 entries, expected num_classes=3"),
        ([{"file": "a.png", "label": [0.5, 0.6, 0.1]}], "must be non-negative and sum to 1"),
        ([{"file": "a.png", "label": 1}, {"file": "a.png", "label": 2}], "duplicate file 'a.png' with conflicting labels"),
        ([{"file": "/etc/passwd", "label": 1}], "escapes the dataset root"),
        ([{"file": "../up.png", "label": 1}], "escapes the dataset root"),
        ([{"file": "a.png", "label": "cat"}], "must be an int class or a list of 3 floats"),
    ],
)
def test_bad_manifests_name_file_and_problem(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(ManifestError) as err:
        read_manifest(path, 3)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="manifest file does not exist"):
        read_manifest(tmp_path / "nope.json", 3)


def test_join_marks_missing_annotations(incomplete_root):
    split = load_split(incomplete_root, "train_ground_truth.json", TRAIN_EXPERTS, 10)
    assert split.t.shape == (48, 3) and split.t.dtype == np.int32
    missing = split.t[:, 2] == -1
    assert missing.tolist() == [i % 3 == 0 for i in range(48)]
    assert (split.t[:, :2] >= 0).all()
    # expert 0 is right exactly on classes c % 3 == 0
    assert ((split.t[:, 0] == split.y) == (split.y % 3 == 0)).all()


def test_expert_file_absent_from_ground_truth(tiny_root):
    records = json.loads((tiny_root / "train_expert_0.json").read_text())
    records.append({"file": "train/9/999.png", "label": 1})
    write(tiny_root / "train_expert_0.json", records)
    with pytest.raises(ManifestError) as err:
        load_split(tiny_root, "train_ground_truth.json", TRAIN_EXPERTS, 10)
    assert "train_expert_0.json, record 48" in str(err.value)
    assert "not in the ground-truth manifest" in str(err.value)


def test_image_file_missing(tiny_root):
    (tiny_root / "train/0/000.png").unlink()
    with pytest.raises(ManifestError, match=r"train_ground_truth.json, record 0: image file 'train/0/000.png' does not exist"):
        load_split(tiny_root, "train_ground_truth.json", TRAIN_EXPERTS, 10)


def test_image_file_not_decodable(tiny_root):
    from datasets.source import ImageFormat, decode_all

    (tiny_root / "train/0/000.png").write_bytes(b"not a png")
    split = load_split(tiny_root, "train_ground_truth.json", TRAIN_EXPERTS, 10)
    with pytest.raises(ManifestError, match=r"000.png: image file cannot be decoded"):
        decode_all(split, ImageFormat(8, 8, 1))


def test_test_experts_must_be_complete(tiny_root):
    records = json.loads((tiny_root / "test_expert_1.json").read_text())[1:]
    write(tiny_root / "test_expert_1.json", records)
    with pytest.raises(ManifestError) as err:
        load_split(tiny_root, "test_ground_truth.json", TEST_EXPERTS, 10, require_complete=True)
    assert "test_expert_1.json" in str(err.value) and "must be complete" in str(err.value)
    assert "1 samples are missing (first: 'test/0/000.png')" in str(err.value)


def test_mismatched_expert_counts(tiny_root):
    train = load_split(tiny_root, "train_ground_truth.json", TRAIN_EXPERTS, 10)
    test = load_split(tiny_root, "test_ground_truth.json", TEST_EXPERTS[:2], 10)
    with pytest.raises(ManifestError, match="train lists 3 expert manifests but test lists 2"):
        check_expert_counts(train, test, "dataset 'tiny'")


def test_root_missing(tmp_path):
    with pytest.raises(ManifestError, match="dataset root does not exist"):
        load_split(tmp_path / "absent", "gt.json", [], 10)
