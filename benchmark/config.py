"""Hydra config -> typed objects (dataset files, task spec, method, workload bounds).

Every invalid setting raises ``ConfigError`` with a message that names the option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from benchmark.spec import TaskSpec, WorkloadBounds, agent_names


class ConfigError(ValueError):
    """An invalid configuration value (message names the option)."""


@dataclass(frozen=True)
class DatasetFiles:
    """Where a dataset's manifests are, with the missing rate applied."""

    name: str
    root: Path
    num_classes: int
    train_ground_truth: str
    train_experts: tuple[str, ...]
    complete_experts: tuple[str, ...] | None
    test_ground_truth: str
    test_experts: tuple[str, ...]


MANAGED_DATA_DIR = "data"  # builders write only below <repo>/data; other roots are user data


def _is_managed(root: Path, managed: Path) -> bool:
    """Whether the harness may (re)build a dataset at ``root``."""
    try:
        root.resolve().relative_to(managed.resolve())
    except ValueError:
        return False
    return True


def resolve_path(path: str | Path, base: Path) -> Path:
    """``path`` as is if absolute, else relative to ``base`` (the repository root)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def _names(value: Any, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{option} must be a list of manifest paths, got {value!r}.")
    return tuple(str(v) for v in value)


def missing_manifest_dir(rate: float, seed: int) -> str:
    """Folder (relative to the dataset root) of the manifests generated at ``rate``."""
    return f"missing/rate_{rate:g}/seed_{seed}"


def dataset_files(cfg: Mapping[str, Any], missing_rate: float, base: Path) -> DatasetFiles:
    """Dataset config + missing rate -> manifest paths (missing manifests generated here).

    A dataset with a ``builder`` is materialised on first use when its root lies below
    the repository's ``data/`` folder; a root elsewhere is the user's and is only read.
    """
    from datasets.generators import write_missing_manifests
    from datasets.manifest import read_manifest

    if not 0.0 <= float(missing_rate) <= 1.0:
        raise ConfigError(f"missing_rate must be in [0, 1], got {missing_rate}.")
    root = resolve_path(cfg["root"], base)
    if cfg.get("builder") and _is_managed(root, base / MANAGED_DATA_DIR):
        from datasets.builders import BUILDERS

        BUILDERS.get(cfg["builder"])(root, **dict(cfg.get("builder_args") or {}))
    if not root.is_dir():
        from datasets.manifest import ManifestError

        raise ManifestError(
            f"{root}: dataset root does not exist or is not a directory (dataset.root="
            f"{cfg['root']!r}; relative roots are resolved against {base})."
        )
    train, test = cfg["train"], cfg["test"]
    experts = _names(train["experts"], "dataset.train.experts")
    complete = _names(train.get("complete_experts"), "dataset.train.complete_experts") or None
    if missing_rate > 0:
        num_classes = int(cfg["num_classes"])
        folder = missing_manifest_dir(float(missing_rate), int(cfg.get("missing_seed", 0)))
        derived = tuple(f"{folder}/{Path(name).name}" for name in experts)
        if not all((root / name).is_file() for name in derived):
            gt = read_manifest(root / train["ground_truth"], num_classes)
            sources = [read_manifest(root / name, num_classes) for name in experts]
            write_missing_manifests(
                sources, gt.files, float(missing_rate), int(cfg.get("missing_seed", 0)),
                [root / name for name in derived],
            )
        complete = complete or experts
        experts = derived
    return DatasetFiles(
        name=str(cfg["name"]),
        root=root,
        num_classes=int(cfg["num_classes"]),
        train_ground_truth=str(train["ground_truth"]),
        train_experts=experts,
        complete_experts=complete,
        test_ground_truth=str(test["ground_truth"]),
        test_experts=_names(test["experts"], "dataset.test.experts"),
    )


def task_spec(cfg: Mapping[str, Any], num_experts: int) -> TaskSpec:
    """The static task description of a dataset config."""
    image = cfg["image"]
    return TaskSpec(
        num_classes=int(cfg["num_classes"]),
        num_experts=num_experts,
        input_shape=(int(image["height"]), int(image["width"]), int(image["channels"])),
        backbone=str(cfg.get("backbone", "small_cnn")),
    )


def workload_bounds(cfg: Mapping[str, Any], num_experts: int) -> WorkloadBounds:
    """Per-agent (lo, hi) from a workload preset, checked for feasibility.

    A preset gives ``classifier: {lo, hi}`` and ``humans: {lo, hi}``; with
    ``balanced_slack`` set, each human gets an equal share of what the classifier leaves,
    +/- the slack; ``lo``/``hi`` lists (E+1 values, classifier last) override everything.
    """
    from benchmark.workload import InfeasibleBoundsError, check_bounds

    classifier = cfg.get("classifier") or {}
    humans = cfg.get("humans") or {}
    c_lo, c_hi = float(classifier.get("lo", 0.0)), float(classifier.get("hi", 1.0))
    h_lo, h_hi = float(humans.get("lo", 0.0)), float(humans.get("hi", 1.0))
    slack = cfg.get("balanced_slack")
    if slack is not None and num_experts > 0:
        h_lo = max(0.0, (1.0 - c_hi) / num_experts - float(slack))
        h_hi = min(1.0, (1.0 - c_lo) / num_experts + float(slack))
    lo = [h_lo] * num_experts + [c_lo]
    hi = [h_hi] * num_experts + [c_hi]
    for key, values in (("lo", cfg.get("lo")), ("hi", cfg.get("hi"))):
        if values is not None:
            values = [float(v) for v in values]
            if len(values) != num_experts + 1:
                raise ConfigError(
                    f"workload.{key} needs {num_experts + 1} values (experts then classifier), "
                    f"got {len(values)}."
                )
            if key == "lo":
                lo = values
            else:
                hi = values
    try:
        check_bounds(np.asarray(lo), np.asarray(hi), agent_names(num_experts))
    except InfeasibleBoundsError as err:
        raise ConfigError(f"workload preset {cfg.get('name', '?')!r}: {err}") from None
    return WorkloadBounds(lo=tuple(lo), hi=tuple(hi))


def build_method(cfg: Mapping[str, Any], spec: TaskSpec):
    """Instantiate the registered method named ``cfg.name`` with ``cfg.params``."""
    from methods import get_method_class
    from methods.common import MethodConfigError

    cls = get_method_class(str(cfg["name"]))
    params = dict(cfg.get("params") or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ConfigError(
            f"method {cfg['name']!r} has no option(s) {', '.join(unknown)}; "
            f"its options are {', '.join(sorted(fields - {'num_experts', 'num_classes'}))}."
        )
    if "num_experts" in fields:
        params["num_experts"] = spec.num_experts
    if "num_classes" in fields:
        params["num_classes"] = spec.num_classes
    try:
        return cls(**params)
    except MethodConfigError as err:
        raise ConfigError(str(err)) from None
