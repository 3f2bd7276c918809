"""One result identity: every config field declares its role, and labels, fingerprint,
training key and block key are projections of one ``CellIdentity`` that follow the roles."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from benchmark import predictions
from benchmark.config import (
    IDENTITY,
    ROLES,
    SECTION,
    CellConfig,
    ConfigError,
    DatasetConfig,
    EvalConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    WorkloadConfig,
    register_configs,
)
from benchmark.identity import CellIdentity, settings_by_role
from benchmark.runner import run_cell
from core.records import load_records
from methods import METHODS
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_pipeline import compose_cfg

register_configs()
SECTIONS = (CellConfig, DatasetConfig, TrainConfig, EvalConfig, WorkloadConfig, TrackingConfig)
SOURCES = {"train/ground_truth": "a" * 64, "images/train": "b" * 20}  # stand-ins for content hashes
NO_DATA = SimpleNamespace(manifests={}, image_digests={"train": "c" * 20, "test": "d" * 20})


def method_nodes() -> dict[str, type]:
    """Each registered method's generated config node (``{name, label, params}``)."""
    store = ConfigStore.instance()
    return {name: OmegaConf.get_type(store.load(f"method/{name}.yaml").node)
            for name in METHODS.names()}


def unmarked(cls: type) -> list[str]:
    """Fields of a config dataclass without an identity role, as ``Class.field``."""
    return [f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls)
            if f.metadata.get(IDENTITY) not in (*ROLES, SECTION)]


def test_every_config_field_declares_its_identity_role():
    nodes = method_nodes()
    assert {"prob_l2d", "classifier_only", "two_stage"} <= set(nodes)
    missing = [name for cls in (*SECTIONS, *nodes.values()) for name in unmarked(cls)]
    assert not missing, f"config fields without an identity role: {', '.join(missing)}"
    for cls in nodes.values():  # the method node: name and options are results, the label renames
        roles = {f.name: f.metadata[IDENTITY] for f in dataclasses.fields(cls)}
        assert roles == {"name": "result", "label": "neutral", "params": "result"}
    assert {f.name for f in dataclasses.fields(CellConfig) if f.metadata[IDENTITY] == SECTION} == {
        "dataset", "method", "workload", "tracking", "train", "eval"}


def test_a_field_without_a_role_is_named():
    @dataclasses.dataclass
    class Inner:
        steps: int = 1  # no role

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner, metadata={IDENTITY: SECTION})

    with pytest.raises(ConfigError, match=r"config field inner\.steps has no identity role: "
                                          r"declare it with result\(\)"):
        settings_by_role(Outer())


def test_settings_are_sorted_by_role():
    cell, _ = compose_cfg(["method=prob_l2d", "workload=paper"])
    found = settings_by_role(cell)
    assert found["result"]["train.learning_rate"] == cell.train.learning_rate
    assert found["result"]["method.params.estep"] == "exact"
    assert found["result"]["workload.classifier.hi"] == pytest.approx(0.2)  # a value dataclass: its field's role
    assert found["measure"] == {"eval.assignment_batch": None}
    assert found["training"] == {"seeds_per_program": 1}
    assert {"train.steps_per_dispatch", "train.loop", "dataset.cache", "dataset.workers",
            "dataset.builder", "method.label", "tracking.enabled", "output_dir",
            "force"} <= set(found["neutral"])
    roles = [set(names) for names in found.values()]
    assert all(not a & b for i, a in enumerate(roles) for b in roles[i + 1:])  # one role each


def projections(overrides: list[str], problem: str | None = None) -> dict:
    """Every projection of the identity of the cell composed from ``overrides``."""
    cell, choices = compose_cfg(overrides)
    identity = CellIdentity.of(cell, choices)
    run = RunConfig.build(cell, REPO_ROOT, identity)
    return {"key": identity.key(), "fingerprint": identity.fingerprint(SOURCES),
            "training_key": predictions.training_key(run, NO_DATA, problem),
            "block_key": predictions.block_key(run)}


def changed(base: dict, other: dict) -> set[str]:
    return {name for name in base if base[name] != other[name]}


ALL = {"key", "fingerprint", "training_key", "block_key"}
BASE = ["method=prob_l2d", "workload=paper"]


@pytest.mark.parametrize("override", ["train.steps_per_dispatch=4", "train.loop=host",
                                      "dataset.workers=2", "dataset.cache=false",
                                      "dataset.memory_limit_mb=1", "force=true",
                                      "output_dir=/elsewhere", "tracking=none"])
def test_a_neutral_setting_changes_nothing(override):
    assert changed(projections(BASE), projections(BASE + [override])) == set()


@pytest.mark.parametrize("override", ["train.learning_rate=0.01", "method.params.estep=meanfield",
                                      "dataset.mean=[0.4]", "missing_rate=0.3",
                                      "eval.validation_fraction=0.2", "train.precision=bf16",
                                      "workload.classifier.hi=0.3"])
def test_a_result_setting_changes_every_projection(override):
    assert changed(projections(BASE), projections(BASE + [override])) == ALL


def test_a_measure_setting_changes_the_label_and_fingerprint_only():
    base, other = projections(BASE), projections(BASE + ["eval.assignment_batch=100"])
    assert changed(base, other) == {"key", "fingerprint"}
    assert other["key"]["method"] == "prob_l2d[eval.assignment_batch=100]"


def test_seeds_per_program_changes_the_block_key_only():
    assert changed(projections(BASE), projections(BASE + ["seeds_per_program=2"])) == {"block_key"}


def test_seeds_of_one_block_share_its_key_only():
    first, second = (projections(BASE + ["seeds_per_program=2", f"seed={seed}"]) for seed in (0, 1))
    assert changed(first, second) == {"key", "fingerprint", "training_key"}
    assert first["key"]["seed"] == 0 and second["key"]["seed"] == 1
    third = projections(BASE + ["seeds_per_program=2", "seed=2"])
    assert third["block_key"] != first["block_key"]  # seeds 2, 3: another block


def test_the_label_only_renames():
    base, other = projections(BASE), projections(BASE + ["method.label=mine"])
    assert changed(base, other) == {"key"} and other["key"]["method"] == "mine"


def test_the_workload_enters_the_training_key_only_of_methods_trained_with_it():
    for method, trained_with in (("prob_l2d", True), ("classifier_only", False), ("two_stage", False),
                                 ("prob_l2d_posthoc", False)):
        none, paper = (projections([f"method={method}", f"workload={w}"]) for w in ("none", "paper"))
        assert changed(none, paper) == ({"key", "fingerprint"} | (
            {"training_key", "block_key"} if trained_with else set())), method


def test_workloads_of_the_same_bounds_share_the_training():
    paper = projections(["method=prob_l2d", "workload=paper"])
    capped = projections(["method=prob_l2d", "workload=none", "workload.classifier.hi=0.2"])
    assert capped["key"]["workload"] == "none[classifier.hi=0.2]" != paper["key"]["workload"]
    assert changed(paper, capped) == {"key", "fingerprint"}  # trained with the same bounds


def test_a_shared_training_problem_shares_its_key_across_methods():
    keys = {method: projections([f"method={method}"], problem="cross_entropy_classifier")["training_key"]
            for method in ("classifier_only", "oracle", "random")}
    assert len(set(keys.values())) == 1, keys
    assert (projections(["method=classifier_only"])["training_key"]
            != keys["classifier_only"])  # the method's own predictions stay its own


def test_a_run_without_its_identity_is_refused():
    cell, _ = compose_cfg(BASE)
    with pytest.raises(ValueError, match=r"has no CellIdentity: build it with RunConfig.build"):
        predictions.training_key(RunConfig.build(cell, REPO_ROOT), NO_DATA)


def test_the_record_stores_the_identity_and_a_neutral_change_reuses_it(tiny_root, tmp_path):
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["workload=paper"])
    record = run_cell(cfg, choices)
    assert record["status"] == "ok", record.get("error")
    identity = CellIdentity.of(cfg, choices)
    (saved,) = load_records(tmp_path / "runs/single")
    assert saved["identity"] == json.loads(json.dumps(identity.record()))  # stored whole
    assert saved["cell"] == identity.key() and saved["variant"] == identity.variant()
    assert saved["identity"]["result"]["train.epochs"] == 2
    assert saved["identity"]["measure"] == {"eval.assignment_batch": None}
    # neutral settings: the same record is a finished result (skipped, not rerun)
    neutral = ["train.steps_per_dispatch=3", "train.loop=host", "dataset.cache=false"]
    again, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["workload=paper", *neutral])
    assert run_cell(again, choices)["status"] == "skipped"
    # into another results folder: a new record from the cached predictions (no training)
    elsewhere, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + [
        "workload=paper", *neutral, f"results_dir={tmp_path / 'other'}"])
    moved = run_cell(elsewhere, choices)
    assert moved["status"] == "ok", moved.get("error")
    assert moved["cell"] == saved["cell"] and moved["run_metrics"] == saved["run_metrics"]
    assert len(list((tmp_path / "cache/predictions").glob(f"{cfg.method.name}-*.npz"))) == 1
