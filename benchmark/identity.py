"""Identity of a result: one ``CellIdentity`` per cell, read from the config fields' roles.

Every config field declares its role (``benchmark.config``: ``result``, ``measure``,
``training``, ``neutral``); ``settings_by_role`` walks the cell once and sorts its settings
by role. Everything that decides "the same result" is a projection of that one identity:

* ``key`` and ``variant`` (the record's path, the report's row, the MLflow run): the result
  and measure settings that differ from the presets' cell;
* ``fingerprint`` (skip a finished cell): the result and measure settings and the content of
  the source manifests and images;
* ``training_key`` (the prediction cache): the result settings but the workload, the
  workload's bounds if the method trains with them, the content of code, manifests, images;
* ``block_key`` (the lock of a block of seeds trained in one program): as the training key
  without the seed and the content, with the training settings and the block's seeds.

A result row is (dataset variant, method variant, missing rate, workload variant, seed).
A variant label is the preset or method name plus every result or measure setting that
differs from what Hydra composes from the chosen presets alone (``baseline_cell``), so
different results never share a record, a prediction-cache entry or an MLflow run:

* method: ``prob_l2d[estep=meanfield]`` (options against the dataclass defaults and the
  tuned preset of the dataset, if any), plus the ``train.*`` / ``eval.*`` settings that
  differ from the experiment's defaults (``classifier_only[train.learning_rate=0.01]``);
  ``method.label`` replaces the label;
* workload: ``paper[classifier.hi=0.3]`` (against ``conf/workload/<preset>.yaml``);
* dataset: ``digits`` or ``digits@<hash>`` when any setting that changes the data differs
  from ``conf/dataset/<preset>.yaml`` (the record lists them under ``variant``).

Neutral settings (``train.steps_per_dispatch``, ``train.loop``, ``dataset.cache``,
``dataset.workers``, folders, tracking, ...) enter none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Mapping

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from benchmark.config import (
    IDENTITY,
    MEASURE,
    NEUTRAL,
    RESULT,
    ROLES,
    SECTION,
    TRAINING,
    CellConfig,
    ConfigError,
    DatasetConfig,
    to_cell,
)
from benchmark.provenance import REPO_ROOT
from core.labels import flatten, stable_hash, variant_label
from core.spec import RECORD_NAME, CellKey

CONF_DIR = REPO_ROOT / "conf"
PRESET_GROUPS = ("dataset", "workload", "experiment")  # with the method: a label's baseline
TRAINING_SECTIONS = ("train", "eval")  # their result and measure changes join the method label
IDENTITY_ROLES = (RESULT, MEASURE, TRAINING)  # what a CellIdentity holds (neutral: nothing)
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


def field_role(f: dataclasses.Field, path: str) -> str:
    """A config field's identity role (``benchmark.config``); ``ConfigError`` names a field
    declared without one."""
    role = f.metadata.get(IDENTITY)
    if role not in (*ROLES, SECTION):
        raise ConfigError(f"config field {path} has no identity role: declare it with result(), "
                          "measure(), training(), neutral() or section() (benchmark.config).")
    return role


def settings_by_role(cell: CellConfig) -> dict[str, dict[str, Any]]:
    """Every setting of ``cell`` as ``{role: {dotted name: value}}``, read from the fields'
    roles: sections are walked, any other value (a list, a mapping, a value dataclass such
    as ``AgentShare``, the method's options) takes its field's role, flattened to leaves."""
    found: dict[str, dict[str, Any]] = {role: {} for role in ROLES}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            path, value = f"{prefix}{f.name}", getattr(node, f.name)
            role = field_role(f, path)
            if role == SECTION:
                walk(value, f"{path}.")
            else:
                found[role].update(flatten({path: plain(value)}))

    walk(cell, "")
    return found


def dataset_identity(dataset: DatasetConfig) -> dict[str, Any]:
    """The dataset settings that define what the data is (neutral fields left out)."""
    return {f.name: plain(getattr(dataset, f.name)) for f in dataclasses.fields(dataset)
            if field_role(f, f"dataset.{f.name}") != NEUTRAL}


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


def under(settings: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The settings whose name starts with ``prefix``, named without it."""
    return {key[len(prefix):]: value for key, value in settings.items() if key.startswith(prefix)}


@dataclasses.dataclass(frozen=True)
class CellIdentity:
    """What makes a cell's result this result: its settings by role (``settings_by_role``;
    neutral ones left out) and, for the labels, the result and measure settings of the cell
    Hydra composes from the same presets (``baseline``). Labels, variant, fingerprint and
    cache keys are its projections; the record stores it whole (``record``).

    Built once per cell, by the runner (``CellIdentity.of``): labels need Hydra's chosen
    presets, and the record's path is known before ``RunConfig.build`` runs (whose errors
    are recorded under that path); the runner hands it to ``RunConfig.build``.
    """

    settings: Mapping[str, Mapping[str, Any]]  # {result, measure, training: {name: value}}
    baseline: Mapping[str, Any]  # the presets' result and measure settings
    method_label: str | None = None  # method.label: renames the method variant (neutral)
    tuned_preset: str | None = None  # the tuned preset Hydra applied (conf/tuned/), if any

    @classmethod
    def of(cls, cell: CellConfig, choices: Mapping[str, str] | None = None) -> "CellIdentity":
        """The identity of a typed cell; ``choices`` are Hydra's chosen presets per group
        (``hydra.runtime.choices``). ``ConfigError`` names an unsafe name."""
        for option, value in (("dataset.name", cell.dataset.name), ("workload.name", cell.workload.name),
                              ("method.label", cell.method.label), ("experiment_name", cell.experiment_name)):
            check_name(value, option)
        settings = settings_by_role(cell)
        base = settings_by_role(baseline_cell(preset_choices(cell, choices)))
        return cls(settings={role: settings[role] for role in IDENTITY_ROLES},
                   baseline={**base[RESULT], **base[MEASURE]},
                   method_label=cell.method.label, tuned_preset=tuned_preset(choices))

    def with_seed(self, seed: int) -> "CellIdentity":
        """This identity under another run seed."""
        return dataclasses.replace(self, settings={**self.settings,
                                                   RESULT: {**self.settings[RESULT], "seed": seed}})

    @property
    def labelled(self) -> dict[str, Any]:
        """The settings labels are made of (result and measure)."""
        return {**self.settings[RESULT], **self.settings[MEASURE]}

    def record(self) -> dict[str, dict[str, Any]]:
        """The identity as a record stores it: ``{role: {setting: value}}``."""
        return {role: dict(self.settings[role]) for role in IDENTITY_ROLES}

    # ----------------------------------------------------------------- labels

    def variant(self) -> dict[str, Any]:
        """The settings behind the labels: per part, those that differ from the presets'."""
        changed, ours, base = changed_settings(self.labelled, self.baseline), self.labelled, self.baseline
        same = {part: ours[f"{part}.name"] == base[f"{part}.name"] for part in ("dataset", "workload")}
        return {
            "method": under(changed, "method.params."),
            "train": {key: value for key, value in changed.items()
                      if key.split(".")[0] in TRAINING_SECTIONS},
            "workload": {key: value for key, value in under(changed, "workload.").items()
                         if key != "name"} if same["workload"] else {},
            "dataset": {key: value for key, value in under(changed, "dataset.").items()
                        if key != "name"} if same["dataset"] else {},
            "tuned_preset": self.tuned_preset,
        }

    def key(self) -> CellKey:
        """The cell key: variant labels (``prob_l2d[estep=meanfield]``), missing rate, seed."""
        settings, variant = self.settings[RESULT], self.variant()
        dataset = str(settings["dataset.name"])
        return CellKey(
            dataset=f"{dataset}@{stable_hash(variant['dataset'], 8)}" if variant["dataset"] else dataset,
            method=str(self.method_label or variant_label(
                str(settings["method.name"]), {**variant["method"], **variant["train"]})),
            missing_rate=float(settings["missing_rate"]),
            workload=variant_label(str(settings["workload.name"]), variant["workload"]),
            seed=int(settings["seed"]),
        )

    # ----------------------------------------------------------------- hashes

    def fingerprint(self, sources: Mapping[str, Any] | None) -> str:
        """Hash of what defines the result and of the content of its ``sources`` (manifest
        and image hashes): a changed setting or an edited source reruns the cell."""
        return stable_hash({"settings": self.labelled, "sources": sources})

    def _trained(self) -> dict[str, Any]:
        """The result settings of the trained model but the workload: training sees the
        workload only through its bounds (derived from it and the experts), if at all."""
        return {key: value for key, value in self.settings[RESULT].items()
                if not key.startswith("workload.")}

    def training_key(self, contents: Mapping[str, Any], bounds: Mapping[str, Any] | None,
                     problem: str | None = None) -> str:
        """Hash of what can change the trained model and its outputs: the result settings,
        the workload ``bounds`` of a method that trains with them (None for the others, which
        then share the key across workloads) and ``contents`` (code, manifests, images). A
        shared training ``problem`` (``Method.training_problem``) replaces the method's
        settings, so every method of that problem shares it. Neutral settings never enter: a
        streamed run (``dataset.cache``) reuses the predictions of an in-memory one."""
        settings = self._trained()
        if problem is not None:
            settings = {key: value for key, value in settings.items() if not key.startswith("method.")}
        return stable_hash({"settings": settings, "bounds": bounds, "problem": problem, **contents}, 20)

    def block_key(self, block: list[int], bounds: Mapping[str, Any] | None) -> str:
        """The same hash for every seed of ``block`` (seeds trained in one program): the
        result settings but the seed, the ``bounds`` trained with, the training settings and
        the block's seeds."""
        settings = {key: value for key, value in self._trained().items() if key != "seed"}
        return stable_hash([settings, bounds, self.settings[TRAINING], block])


def cell_identity(cell: CellConfig, choices: Mapping[str, str] | None = None
                  ) -> tuple[CellKey, dict[str, Any]]:
    """The cell key and the variant of a typed cell (``CellIdentity.of``'s label projections)."""
    identity = CellIdentity.of(cell, choices)
    return identity.key(), identity.variant()


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
