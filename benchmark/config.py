"""Hydra config -> frozen typed objects, parsed once at the entry point.

* ``register_method_configs``: every registered method becomes the Hydra config
  ``method=<name>`` (a structured config generated from its dataclass: the dataclass is
  the one definition of a method's options and defaults).
* ``parse_run``: a composed cell config -> ``RunConfig`` (dataset, loader, optimiser,
  method, workload bounds, paths). Every invalid setting raises ``ConfigError`` naming
  the option.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from benchmark.bounds import InfeasibleBoundsError, check_bounds
from core.spec import TASK_FIELDS, Method, TaskSpec, WorkloadBounds, agent_names
from datasets.source import Augment, LoaderConfig
from methods import METHODS, get_method_class, load_all
from methods.common import MethodConfigError


class ConfigError(ValueError):
    """An invalid configuration value (message names the option)."""


def resolve_path(path: str | Path, base: Path) -> Path:
    """``path`` as is if absolute, else relative to ``base`` (the repository root)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


# ----------------------------------------------------------------------------- method configs


def method_options(cls: type) -> dict[str, Any]:
    """A method class's user-settable options and their defaults (task fields excluded)."""
    return {
        f.name: f.default for f in dataclasses.fields(cls)
        if f.name not in TASK_FIELDS and f.default is not dataclasses.MISSING
    }


def method_params_schema(cls: type) -> type:
    """A dataclass of ``cls``'s options (their types and defaults), for Hydra's ConfigStore."""
    hints = typing.get_type_hints(cls)
    fields = [(name, hints[name], dataclasses.field(default=default))
              for name, default in method_options(cls).items()]
    return dataclasses.make_dataclass(f"{cls.__name__}Options", fields, frozen=False)


def register_method_configs() -> None:
    """Store ``method=<name>`` in Hydra's ConfigStore for every registered method.

    Each node is ``{name, label, params}``: ``params`` is typed from the dataclass, so an
    unknown option or a wrong type fails when Hydra composes the config; ``label`` (optional)
    names the variant in reports instead of the generated label.
    """
    from hydra.core.config_store import ConfigStore


    load_all()
    store = ConfigStore.instance()
    for name in METHODS.names():
        options = method_params_schema(METHODS.get(name))
        node = dataclasses.make_dataclass(
            f"{METHODS.get(name).__name__}Config",
            [("name", str, dataclasses.field(default=name)),
             ("label", Optional[str], dataclasses.field(default=None)),
             ("params", options, dataclasses.field(default_factory=options))],
        )
        store.store(group="method", name=name, node=node)


def build_method(cfg: Mapping[str, Any], spec: TaskSpec) -> Method:
    """Instantiate the registered method ``cfg["name"]`` with ``cfg["params"]``."""

    cls = get_method_class(str(cfg["name"]))
    params = dict(cfg.get("params") or {})
    options = method_options(cls)
    unknown = sorted(set(params) - set(options))
    if unknown:
        raise ConfigError(
            f"method {cfg['name']!r} has no option(s) {', '.join(unknown)}; "
            f"its options are {', '.join(sorted(options)) or '(none)'}."
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    task = {"num_experts": spec.num_experts, "num_classes": spec.num_classes}
    params.update({k: v for k, v in task.items() if k in fields})
    try:
        return cls(**params)
    except MethodConfigError as err:
        raise ConfigError(str(err)) from None


# ----------------------------------------------------------------------------- typed settings


def _number(cfg: Mapping[str, Any], key: str, option: str, kind: type, minimum=None, default=None):
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{option} must be {'an integer' if kind is int else 'a number'}, got {value!r}.")
    value = kind(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {value}.")
    return value


@dataclass(frozen=True)
class TrainSettings:
    """Training loop settings (``train.*``)."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    weight_decay: float

    @classmethod
    def parse(cls, cfg: Mapping[str, Any]) -> "TrainSettings":
        return cls(
            epochs=_number(cfg, "epochs", "train.epochs", int, 1),
            batch_size=_number(cfg, "batch_size", "train.batch_size", int, 1),
            learning_rate=_number(cfg, "learning_rate", "train.learning_rate", float, 0.0),
            momentum=_number(cfg, "momentum", "train.momentum", float, 0.0),
            weight_decay=_number(cfg, "weight_decay", "train.weight_decay", float, 0.0),
        )


def _flag(cfg: Mapping[str, Any], key: str, option: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{option} must be true or false, got {value!r}.")
    return value


def _frozen(value: Any) -> Any:
    """Lists -> tuples and mappings -> sorted item tuples, recursively (hashable settings)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _names(value: Any, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{option} must be a list of manifest paths, got {value!r}.")
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class DatasetConfig:
    """A dataset preset (``dataset.*``) with its paths resolved."""

    name: str
    root: Path
    builder: str | None
    builder_args: tuple[tuple[str, Any], ...]
    num_classes: int
    image: tuple[int, int, int]  # (H, W, C) images are decoded (resized) to
    crop: int | None  # square crop fed to the network: random in training, centred at test
    backbone: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: tuple[tuple[str, Any], ...]
    cache: bool
    missing_seed: int | None  # None: the run seed draws the missing annotations
    train_ground_truth: str
    train_experts: tuple[str, ...]
    complete_experts: tuple[str, ...] | None
    test_ground_truth: str
    test_experts: tuple[str, ...]
    manifest_dirs: tuple[str, ...] = (".",)  # folders (under root) searched for each manifest
    published_missing: str | None = None  # e.g. "{stem}_{rate}.json": published missing draws
    workers: int = 0  # streamed data: Grain worker processes (0: threads of the main process)
    memory_limit_mb: float = 2048.0  # stream when the decoded train + test images exceed this

    @classmethod
    def parse(cls, cfg: Mapping[str, Any], base: Path) -> "DatasetConfig":
        image = cfg["image"]
        train, test = cfg["train"], cfg["test"]
        return cls(
            name=str(cfg["name"]),
            root=resolve_path(cfg["root"], base),
            builder=cfg.get("builder"),
            builder_args=_frozen(cfg.get("builder_args") or {}),
            num_classes=_number(cfg, "num_classes", "dataset.num_classes", int, 2),
            image=(int(image["height"]), int(image["width"]), int(image["channels"])),
            crop=None if cfg.get("crop") is None else _number(cfg, "crop", "dataset.crop", int, 1),
            backbone=str(cfg.get("backbone", "small_cnn")),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            augment=_frozen(cfg.get("augment") or {}),
            cache=_flag(cfg, "cache", "dataset.cache", True),
            missing_seed=None if cfg.get("missing_seed") is None
            else _number(cfg, "missing_seed", "dataset.missing_seed", int, 0),
            train_ground_truth=str(train["ground_truth"]),
            train_experts=_names(train["experts"], "dataset.train.experts"),
            complete_experts=_names(train.get("complete_experts"), "dataset.train.complete_experts") or None,
            test_ground_truth=str(test["ground_truth"]),
            test_experts=_names(test["experts"], "dataset.test.experts"),
            manifest_dirs=_names(cfg.get("manifest_dirs"), "dataset.manifest_dirs") or (".",),
            published_missing=cfg.get("published_missing"),
            workers=_number(cfg, "workers", "dataset.workers", int, 0, default=0),
            memory_limit_mb=_number(cfg, "memory_limit_mb", "dataset.memory_limit_mb", float, 0.0,
                                    default=2048.0),
        )

    def task_spec(self) -> TaskSpec:
        """The static task description (experts counted from the training manifests)."""
        shape = self.image if self.crop is None else (self.crop, self.crop, self.image[2])
        return TaskSpec(self.num_classes, len(self.train_experts), shape, self.backbone)

    def loader(self, batch_size: int):
        """The training loader configuration (``datasets.source.LoaderConfig``)."""

        return LoaderConfig(batch_size=batch_size, mean=self.mean, std=self.std,
                            augment=Augment(**dict(self.augment)), drop_remainder=True,
                            crop=self.crop, workers=self.workers)


def workload_bounds(cfg: Mapping[str, Any], num_experts: int) -> WorkloadBounds:
    """Per-agent (lo, hi) from a workload preset, checked for feasibility.

    A preset gives ``classifier: {lo, hi}`` and ``humans: {lo, hi}``; ``coverage: c`` (a
    coverage target) sets the classifier's ``lo = hi = c``: exactly ``round(c N)`` of N
    samples go to the classifier (``benchmark.assignment.integer_capacities``). With
    ``balanced_slack`` set, each human gets an equal share of what the classifier leaves,
    +/- the slack; ``lo``/``hi`` lists (E+1 values, classifier last) override everything.
    """

    classifier = cfg.get("classifier") or {}
    humans = cfg.get("humans") or {}
    c_lo, c_hi = float(classifier.get("lo", 0.0)), float(classifier.get("hi", 1.0))
    h_lo, h_hi = float(humans.get("lo", 0.0)), float(humans.get("hi", 1.0))
    if cfg.get("coverage") is not None:
        c_lo = c_hi = _number(cfg, "coverage", "workload.coverage", float, 0.0)
        if c_lo > 1.0:
            raise ConfigError(f"workload.coverage must be in [0, 1] (the classifier's share of "
                              f"the samples), got {c_lo:g}.")
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
        check_bounds(lo, hi, agent_names(num_experts))
    except InfeasibleBoundsError as err:
        raise ConfigError(f"workload preset {cfg.get('name', '?')!r}: {err}") from None
    return WorkloadBounds(lo=tuple(lo), hi=tuple(hi))


@dataclass(frozen=True)
class RunConfig:
    """Everything one grid cell needs, typed and validated."""

    dataset: DatasetConfig  # missing_seed resolved (never None)
    missing_rate: float
    seed: int
    missing_seed_source: str  # "run seed" or "dataset.missing_seed"
    spec: TaskSpec
    method: Method
    bounds: WorkloadBounds
    train: TrainSettings
    validation_fraction: float  # held out of the training split, never trained on
    validation_seed: int
    assignment_batch: int | None
    results_dir: Path
    cache_dir: Path  # trained models' test predictions
    data_cache_dir: Path  # derived data: missing-annotation manifests, decoded images
    force: bool
    tracking: Mapping[str, Any]
    seeds_per_program: int = 1  # consecutive seeds trained together as one vmapped program


def parse_run(cfg: Mapping[str, Any], base: Path) -> RunConfig:
    """A composed cell config (a plain dict) -> ``RunConfig``; ``ConfigError`` names bad options."""
    missing_rate = _number(cfg, "missing_rate", "missing_rate", float, 0.0)
    if missing_rate > 1.0:
        raise ConfigError(f"missing_rate must be in [0, 1], got {missing_rate}.")
    dataset = DatasetConfig.parse(cfg["dataset"], base)
    seed = _number(cfg, "seed", "seed", int, 0)
    source = "dataset.missing_seed"
    if dataset.missing_seed is None:  # by default the run seed also draws the missing pattern
        dataset, source = dataclasses.replace(dataset, missing_seed=seed), "run seed"
    spec = dataset.task_spec()
    evaluation = cfg.get("eval") or {}
    batch = evaluation.get("assignment_batch")
    validation_fraction = _number(evaluation, "validation_fraction", "eval.validation_fraction", float, 0.0)
    if validation_fraction >= 1.0:
        raise ConfigError(f"eval.validation_fraction must be in [0, 1), got {validation_fraction}.")
    return RunConfig(
        dataset=dataset,
        missing_rate=missing_rate,
        seed=seed,
        missing_seed_source=source,
        spec=spec,
        method=build_method(cfg["method"], spec),
        bounds=workload_bounds(cfg["workload"], spec.num_experts),
        train=TrainSettings.parse(cfg["train"]),
        validation_fraction=validation_fraction,
        validation_seed=_number(evaluation, "validation_seed", "eval.validation_seed", int, 0),
        assignment_batch=None if batch is None else _number(cfg["eval"], "assignment_batch",
                                                            "eval.assignment_batch", int, 1),
        results_dir=resolve_path(cfg["results_dir"], base),
        cache_dir=resolve_path(cfg["cache_dir"], base),
        data_cache_dir=resolve_path(cfg["data_cache_dir"], base),
        force=bool(cfg.get("force", False)),
        tracking=dict(cfg.get("tracking") or {}),
        seeds_per_program=_number(cfg, "seeds_per_program", "seeds_per_program", int, 1, default=1),
    )
