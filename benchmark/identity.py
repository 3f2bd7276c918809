"""Identity of a result: variant labels, the record path and the settings fingerprint.

A result row is (dataset variant, method variant, missing rate, workload variant, seed).
A variant label is the preset or method name plus every setting that differs from what
Hydra composes from the chosen presets alone (``baseline_cell``), so different settings
never share a record, a prediction-cache entry or an MLflow run:

* method: ``prob_l2d[estep=meanfield]`` (options against the dataclass defaults and the
  tuned preset of the dataset, if any), plus the ``train.*`` / ``eval.*`` settings that
  differ from the experiment's defaults (``classifier_only[train.learning_rate=0.01]``);
  ``method.label`` replaces the label;
* workload: ``paper[classifier.hi=0.3]`` (against ``conf/workload/<preset>.yaml``);
* dataset: ``digits`` or ``digits@<hash>`` when any setting that changes the data differs
  from ``conf/dataset/<preset>.yaml`` (the record lists them under ``variant``); fields
  marked ``NEUTRAL`` (how data is held or read) never count.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Mapping

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from benchmark.config import NEUTRAL, CellConfig, ConfigError, DatasetConfig, method_params, to_cell
from benchmark.provenance import REPO_ROOT
from core.labels import flatten, stable_hash, variant_label
from core.spec import RECORD_NAME, CellKey

CONF_DIR = REPO_ROOT / "conf"
PRESET_GROUPS = ("dataset", "workload", "experiment")  # with the method: a label's baseline
TRAINING_SECTIONS = ("train", "eval")
SAFE_PATH = re.compile(r"[^A-Za-z0-9._=,+@\[\]-]")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+@-]{0,99}")
MAX_COMPONENT = 120


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def changed_settings(actual: Mapping[str, Any], default: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened settings of ``actual`` whose value differs from (or is absent in) ``default``."""
    base = flatten(default)
    return {key: value for key, value in sorted(flatten(actual).items())
            if key not in base or not _same(value, base[key])}


def plain(value: Any) -> Any:
    """A config dataclass as nested dicts with plain values (paths as text)."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def dataset_identity(dataset: DatasetConfig) -> dict[str, Any]:
    """The dataset settings that define what the data is (``NEUTRAL`` fields left out)."""
    return {f.name: plain(getattr(dataset, f.name)) for f in dataclasses.fields(dataset)
            if not f.metadata.get(NEUTRAL)}


def preset_choices(cell: CellConfig, choices: Mapping[str, str] | None) -> tuple:
    """The presets a cell was composed from (Hydra's ``choices``; without them, the presets
    named like the cell's ``dataset.name``, ``workload.name`` and ``experiment_name``), the
    method as registered: what ``baseline_cell`` composes."""
    if choices is None:
        choices = {"dataset": cell.dataset.name, "workload": cell.workload.name,
                   "experiment": cell.experiment_name}
    known = {group: str(choice) for group, choice in choices.items()
             if group in PRESET_GROUPS and choice and (CONF_DIR / group / f"{choice}.yaml").is_file()}
    return tuple(sorted({**known, "method": str(cell.method.name)}.items()))


@functools.lru_cache(maxsize=64)
def baseline_cell(choices: tuple) -> CellConfig:
    """The cell Hydra composes from the presets ``choices`` alone (no other override): what
    a variant label is measured against. Composed by Hydra itself (the running app's, or
    one initialised on ``conf/``), once per distinct choice per process."""
    overrides = [f"{group}={choice}" for group, choice in choices]
    if GlobalHydra.instance().is_initialized():
        return to_cell(compose(config_name="config", overrides=overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_cell(compose(config_name="config", overrides=overrides))


def tuned_preset(choices: Mapping[str, str] | None) -> str | None:
    """The tuned preset Hydra applied (``conf/tuned/<dataset>_<method>.yaml``), if one exists."""
    name = (choices or {}).get("tuned")
    return name if name and (CONF_DIR / "tuned" / f"{name}.yaml").is_file() else None


def cell_identity(cell: CellConfig, choices: Mapping[str, str] | None = None
                  ) -> tuple[CellKey, dict[str, Any]]:
    """The cell key (variant labels) of a typed cell config and the settings behind the labels.

    ``choices`` are Hydra's chosen presets per group (``hydra.runtime.choices``).
    """
    for option, value in (("dataset.name", cell.dataset.name), ("workload.name", cell.workload.name),
                          ("method.label", cell.method.label), ("experiment_name", cell.experiment_name)):
        check_name(value, option)
    base = baseline_cell(preset_choices(cell, choices))
    method_name = str(cell.method.name)
    method_changes = changed_settings(method_params(cell), method_params(base))
    training_changes = {
        f"{section}.{key}": value
        for section in TRAINING_SECTIONS
        for key, value in changed_settings(plain(getattr(cell, section)),
                                           plain(getattr(base, section))).items()
    }
    same_workload = cell.workload.name == base.workload.name
    workload_changes = {k: v for k, v in changed_settings(
        plain(cell.workload), plain(base.workload)).items() if k != "name"} if same_workload else {}
    same_dataset = cell.dataset.name == base.dataset.name
    dataset_changes = changed_settings(dataset_identity(cell.dataset),
                                       dataset_identity(base.dataset)) if same_dataset else {}
    dataset_name = str(cell.dataset.name)
    key = CellKey(
        dataset=f"{dataset_name}@{stable_hash(dataset_changes, 8)}" if dataset_changes else dataset_name,
        method=str(cell.method.label or variant_label(
            method_name, {**method_changes, **training_changes})),
        missing_rate=float(cell.missing_rate),
        workload=variant_label(str(cell.workload.name), workload_changes),
        seed=int(cell.seed),
    )
    variant = {"method": method_changes, "train": training_changes,
               "workload": workload_changes, "dataset": dataset_changes,
               "tuned_preset": tuned_preset(choices)}
    return key, variant


def check_name(value: Any, option: str) -> None:
    """Raise ``ConfigError`` unless a user-given name is a safe output path component."""
    if value is not None and not SAFE_NAME.fullmatch(str(value)):
        raise ConfigError(
            f"{option}={value!r} names folders under the results directory: use 1-100 letters, "
            "digits or . _ - + = , @, starting with a letter or digit (no '/' or '..')."
        )


def path_component(label: str) -> str:
    """A label as one safe path component (no separators, no ``..``; long labels hashed)."""
    safe = SAFE_PATH.sub("_", label)
    if safe.strip(".") == "":
        safe = "_" + safe
    if len(safe) > MAX_COMPONENT:
        safe = f"{safe[:MAX_COMPONENT - 17]}~{stable_hash(label, 16)}"
    return safe


def record_path(results_dir: Path, cell: CellKey) -> Path:
    """``<results>/<dataset>/<method>/mr<rate>/<workload>/seed<seed>/result.json``."""
    return (results_dir / path_component(cell["dataset"]) / path_component(cell["method"])
            / f"mr{cell['missing_rate']:g}" / path_component(cell["workload"])
            / f"seed{cell['seed']}" / RECORD_NAME)


def settings_fingerprint(cell: CellConfig, manifest_hashes: Mapping[str, Any] | None) -> str:
    """Hash of every setting that defines a cell's result and of the content of its source
    manifests (a changed setting or an edited manifest reruns the cell)."""
    relevant = {"dataset": {"name": cell.dataset.name, **dataset_identity(cell.dataset)},
                "manifests": manifest_hashes, "method": plain(cell.method),
                **{key: plain(getattr(cell, key)) for key in (
                    "workload", "train", "eval", "missing_rate", "seed")}}
    return stable_hash(relevant)
