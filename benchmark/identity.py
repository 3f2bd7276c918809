"""Identity of a result: variant labels, the record path and the settings fingerprint.

A result row is (dataset variant, method variant, missing rate, workload variant, seed).
A variant label is the preset or method name plus every setting that differs from its
default, so different settings never share a record, a prediction-cache entry or an
MLflow run:

* method: ``prob_l2d[estep=meanfield]`` (options against the dataclass defaults and the
  tuned preset of the dataset, if any), plus the ``train.*`` / ``eval.*`` settings that
  differ from the experiment's defaults (``classifier_only[train.learning_rate=0.01]``);
  ``method.label`` replaces the label;
* workload: ``paper[classifier.hi=0.3]`` (against ``conf/workload/<preset>.yaml``);
* dataset: ``digits`` or ``digits@<hash>`` when any setting that changes the data differs
  from ``conf/dataset/<preset>.yaml`` (the record lists them under ``variant``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Mapping

from benchmark.config import ConfigError, method_options
from benchmark.provenance import REPO_ROOT
from core.labels import flatten, stable_hash, variant_label
from core.spec import RECORD_NAME, CellKey
from methods import get_method_class

CONF_DIR = REPO_ROOT / "conf"
# dataset settings that never change what a result measures (how data is cached, held,
# read or built, not what it is; streamed data draws its augmentation per sample instead)
DATASET_NEUTRAL = frozenset({"name", "cache", "builder", "memory_limit_mb", "workers"})
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


@functools.lru_cache(maxsize=64)
def _load_yaml(path: str) -> tuple[dict, tuple[str, ...]]:
    """A config file's keys (without ``defaults`` and ``hydra``) and the names its defaults
    list takes from its own group (``- other_preset``, before ``_self_``)."""
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        return {}, ()
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    defaults = data.pop("defaults", None) or []
    data.pop("hydra", None)
    inherited = tuple(entry for entry in defaults if isinstance(entry, str) and entry != "_self_")
    return data, inherited


def _merged(base: dict, overlay: Mapping[str, Any]) -> dict:
    """``base`` overlaid by ``overlay`` one level deep (sections merge, values replace)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def preset(group: str, name: str) -> dict | None:
    """The preset ``conf/<group>/<name>.yaml`` as a dict (over the same-group presets its
    defaults list names), or None if there is none."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        return None
    data, inherited = _load_yaml(str(path))
    out: dict = {}
    for parent in inherited:
        out = _merged(out, preset(group, parent) or {})
    return _merged(out, data)


def experiment_defaults(experiment: str | None, tuned: str | None = None) -> dict:
    """``config.yaml`` overlaid with the tuned preset ``conf/tuned/<tuned>.yaml`` and then
    ``conf/experiment/<experiment>.yaml`` (the defaults list's order; top-level keys)."""
    base = _load_yaml(str(CONF_DIR / "config.yaml"))[0]
    for overlay in (preset("tuned", tuned) if tuned else None,
                    preset("experiment", experiment) if experiment else None):
        base = _merged(base, overlay or {})
    return base


def _against_preset(section: Mapping[str, Any], group: str, choice: str | None,
                    experiment: Mapping[str, Any]) -> dict[str, Any]:
    default = preset(group, choice or str(section.get("name")))
    if default is None:  # not a known preset: the settings define it, nothing to compare
        return {}
    overlay = experiment.get(group)
    if isinstance(overlay, Mapping):
        default = {**default, **overlay}
    return changed_settings(section, default)


def cell_identity(cfg: Mapping[str, Any], choices: Mapping[str, str] | None = None
                  ) -> tuple[CellKey, dict[str, Any]]:
    """The cell key (variant labels) of a composed config and the settings behind the labels.

    ``choices`` are Hydra's chosen presets per group (``hydra.runtime.choices``); without
    them the presets are looked up by the ``name`` keys and ``experiment_name``.
    """


    for option, value in (("dataset.name", cfg["dataset"]["name"]), ("workload.name", cfg["workload"]["name"]),
                          ("method.label", cfg["method"].get("label"))):
        check_name(value, option)
    choices = dict(choices or {})
    experiment = experiment_defaults(choices.get("experiment") or cfg.get("experiment_name"),
                                     choices.get("tuned"))
    method_cfg = cfg["method"]
    method_name = str(method_cfg["name"])
    method_defaults = {**method_options(get_method_class(method_name)),
                       **((experiment.get("method") or {}).get("params") or {})}  # tuned values
    method_changes = changed_settings(method_cfg.get("params") or {}, method_defaults)
    training_changes = {
        f"{section}.{key}": value
        for section in TRAINING_SECTIONS
        for key, value in changed_settings(cfg.get(section) or {}, experiment.get(section) or {}).items()
    }
    workload_changes = {k: v for k, v in _against_preset(
        cfg["workload"], "workload", choices.get("workload"), experiment).items() if k != "name"}
    dataset_changes = {k: v for k, v in _against_preset(
        cfg["dataset"], "dataset", choices.get("dataset"), experiment).items()
        if k.split(".")[0] not in DATASET_NEUTRAL}
    dataset_name = str(cfg["dataset"]["name"])
    cell = CellKey(
        dataset=f"{dataset_name}@{stable_hash(dataset_changes, 8)}" if dataset_changes else dataset_name,
        method=str(method_cfg.get("label") or variant_label(
            method_name, {**method_changes, **training_changes})),
        missing_rate=float(cfg["missing_rate"]),
        workload=variant_label(str(cfg["workload"]["name"]), workload_changes),
        seed=int(cfg["seed"]),
    )
    variant = {"method": method_changes, "train": training_changes,
               "workload": workload_changes, "dataset": dataset_changes,
               "tuned_preset": choices.get("tuned")}
    return cell, variant


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


def settings_fingerprint(cfg: Mapping[str, Any], manifest_hashes: Mapping[str, Any] | None) -> str:
    """Hash of every setting that defines a cell's result and of the content of its source
    manifests (a changed setting or an edited manifest reruns the cell)."""
    dataset = {k: v for k, v in (cfg.get("dataset") or {}).items() if k not in DATASET_NEUTRAL - {"name"}}
    relevant = {"dataset": dataset, "manifests": manifest_hashes, **{k: cfg.get(k) for k in (
        "method", "workload", "train", "eval", "missing_rate", "seed")}}
    return stable_hash(relevant)
