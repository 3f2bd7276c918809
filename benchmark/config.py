"""One typed configuration: Hydra composes it, ``to_cell`` converts it once, the dataclasses
validate it.

The dataclasses below are Hydra's schema (``register_configs`` stores them in the
ConfigStore; ``conf/config.yaml`` starts from ``cell_schema``), so an unknown key or a value
of the wrong type fails while Hydra composes the config, naming the key. ``to_cell`` runs
``OmegaConf.to_object`` once per cell; each dataclass's ``__post_init__`` then checks ranges
and raises ``ConfigError`` naming the option (``train.epochs must be >= 1, got 0.``).
``RunConfig.build`` adds what a cell derives from them (resolved paths, task, method,
workload bounds); nothing is parsed twice.

Every registered method is the config ``method=<name>``, generated from its dataclass (the
one definition of its options and defaults).

Every field says what it does to a result (its ``identity`` role, set by the field helpers
``result``, ``measure``, ``training``, ``neutral`` and ``section`` below); the result's
identity (``benchmark.identity.CellIdentity``: labels, fingerprint, cache keys) is read from
these roles alone, so a new setting is declared once, where it is defined.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from benchmark.bounds import InfeasibleBoundsError, check_bounds
from core.spec import TASK_FIELDS, Method, TaskSpec, WorkloadBounds, agent_names
from datasets.source import Augment, LoaderConfig
from methods import METHODS, get_method_class, load_all
from methods.common import MethodConfigError

if TYPE_CHECKING:
    from benchmark.identity import CellIdentity

IDENTITY = "identity"  # field metadata key: the field's role in a result's identity
RESULT = "result"  # changes the trained model and what is measured: labels, fingerprint, both keys
MEASURE = "measure"  # changes what is measured from the same model: labels and fingerprint
TRAINING = "training"  # changes how seeds are trained together, not any seed's model: block key
NEUTRAL = "neutral"  # how it runs (data held or read, loop, folders, tracking): nothing
ROLES = (RESULT, MEASURE, TRAINING, NEUTRAL)
SECTION = "section"  # a field holding a config section whose own fields carry the roles


class ConfigError(ValueError):
    """An invalid configuration value (message names the option)."""


def require(ok: bool, option: str, requirement: str, value: Any) -> None:
    """Raise ``ConfigError("<option> must be <requirement>, got <value>.")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{option} must be {requirement}, got {value!r}.")


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def resolve_path(path: str | Path, base: Path) -> Path:
    """``path`` as is if absolute, else relative to ``base`` (the repository root)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def inside_folder(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, symbolic links resolved."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


# ----------------------------------------------------------------------------- roles


def role_field(role: str, default: Any = dataclasses.MISSING,
               factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its identity ``role`` (a value dataclass it holds, such as
    ``AgentShare``, takes the field's role)."""
    return field(default=default, default_factory=factory, metadata={IDENTITY: role})


def result(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A setting that changes the trained model and what is measured."""
    return role_field(RESULT, default, factory)


def measure(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A setting that changes what is measured from the same trained model."""
    return role_field(MEASURE, default, factory)


def training(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A setting that changes how seeds are trained together, not any seed's model."""
    return role_field(TRAINING, default, factory)


def neutral(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A setting of how a cell runs (how data is held or read, folders, tracking): never
    part of a result's identity."""
    return role_field(NEUTRAL, default, factory)


def section(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A config section (``dataset``, ``train``, ...): its own fields carry the roles."""
    return role_field(SECTION, default, factory)


# ----------------------------------------------------------------------------- groups


TRAIN_LOOPS = ("auto", "device", "host")  # auto: device for in-memory data, host for streamed
PRECISIONS = {"fp32": None, "bf16": "bfloat16"}  # train.precision -> the backbones' compute dtype


@dataclass
class TrainConfig:
    """The training loop (``train.*``): SGD with momentum, cosine decay."""

    epochs: int = result(40)
    batch_size: int = result(128)
    learning_rate: float = result(0.05)
    momentum: float = result(0.9)
    weight_decay: float = result(5.0e-4)
    loop: str = neutral("auto")  # device: batches built on the device (in-memory data); host: host batches
    steps_per_dispatch: Optional[int] = neutral(None)  # device loop; null: an epoch (accelerators), 1 (CPU)
    precision: str = result("fp32")  # bf16: the backbone computes in bfloat16 (float32 parameters)

    def __post_init__(self):
        require(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        require(self.loop in TRAIN_LOOPS, "train.loop", f"one of {', '.join(TRAIN_LOOPS)}", self.loop)
        require(self.steps_per_dispatch is None or self.steps_per_dispatch >= 1,
                "train.steps_per_dispatch", "null or >= 1", self.steps_per_dispatch)
        require(self.precision in PRECISIONS, "train.precision", f"one of {', '.join(PRECISIONS)}",
                self.precision)
        require(self.batch_size >= 1, "train.batch_size", ">= 1", self.batch_size)
        for name in ("learning_rate", "momentum", "weight_decay"):
            value = getattr(self, name)
            require(finite(value) and value >= 0, f"train.{name}", "a finite number >= 0", value)


@dataclass
class EvalConfig:
    """Evaluation (``eval.*``)."""

    assignment_batch: Optional[int] = measure(None)  # solve the test assignment per chunk of this size
    validation_fraction: float = result(0.1)  # class-stratified share of the training split held out
    validation_seed: int = result(0)  # the same split for every method and run seed

    def __post_init__(self):
        require(self.assignment_batch is None or self.assignment_batch >= 1,
                "eval.assignment_batch", "null or >= 1", self.assignment_batch)
        require(finite(self.validation_fraction) and 0 <= self.validation_fraction < 1,
                "eval.validation_fraction", "in [0, 1)", self.validation_fraction)
        require(self.validation_seed >= 0, "eval.validation_seed", ">= 0", self.validation_seed)


@dataclass
class AgentShare:
    """Bounds on one kind of agent's share of the samples."""

    lo: float = 0.0
    hi: float = 1.0


@dataclass
class WorkloadConfig:
    """A workload preset (``workload.*``, ``conf/workload/``)."""

    name: str = result(MISSING)
    classifier: AgentShare = result(factory=AgentShare)
    humans: AgentShare = result(factory=AgentShare)
    coverage: Optional[float] = result(None)  # a target: exactly round(c N) samples to the classifier
    balanced_slack: Optional[float] = result(None)  # humans: equal shares of the rest, +/- this
    lo: Optional[List[float]] = result(None)  # per-agent overrides: E+1 values, classifier last
    hi: Optional[List[float]] = result(None)

    def __post_init__(self):
        require(self.coverage is None or (finite(self.coverage) and 0 <= self.coverage <= 1),
                "workload.coverage", "null or in [0, 1] (the classifier's share of the samples)",
                self.coverage)
        require(self.balanced_slack is None or (finite(self.balanced_slack) and self.balanced_slack >= 0),
                "workload.balanced_slack", "null or >= 0", self.balanced_slack)

    def bounds(self, num_experts: int) -> WorkloadBounds:
        """Per-agent (lo, hi), checked for feasibility.

        ``classifier`` and ``humans`` give each kind's bounds; ``coverage: c`` sets the
        classifier's ``lo = hi = c`` (exactly ``round(c N)`` of N samples,
        ``benchmark.assignment.integer_capacities``); with ``balanced_slack`` each human
        gets an equal share of what the classifier leaves, +/- the slack; ``lo``/``hi``
        lists override everything.
        """
        c_lo, c_hi = self.classifier.lo, self.classifier.hi
        h_lo, h_hi = self.humans.lo, self.humans.hi
        if self.coverage is not None:
            c_lo = c_hi = self.coverage
        if self.balanced_slack is not None and num_experts > 0:
            h_lo = max(0.0, (1.0 - c_hi) / num_experts - self.balanced_slack)
            h_hi = min(1.0, (1.0 - c_lo) / num_experts + self.balanced_slack)
        lo = [h_lo] * num_experts + [c_lo]
        hi = [h_hi] * num_experts + [c_hi]
        for key, values in (("lo", self.lo), ("hi", self.hi)):
            if values is not None:
                require(len(values) == num_experts + 1, f"workload.{key}",
                        f"{num_experts + 1} values (experts then classifier)", list(values))
                if key == "lo":
                    lo = [float(v) for v in values]
                else:
                    hi = [float(v) for v in values]
        try:
            check_bounds(lo, hi, agent_names(num_experts))
        except InfeasibleBoundsError as err:
            raise ConfigError(f"workload preset {self.name!r}: {err}") from None
        return WorkloadBounds(lo=tuple(lo), hi=tuple(hi))


@dataclass
class ImageSize:
    """(H, W, C) that images are decoded (resized) to."""

    height: int = MISSING
    width: int = MISSING
    channels: int = MISSING


@dataclass
class SplitManifests:
    """A split's manifests, relative to the dataset root (or one of its ``manifest_dirs``)."""

    ground_truth: str = MISSING
    experts: List[str] = MISSING
    complete_experts: Optional[List[str]] = None  # the experts before annotations were removed


@dataclass(eq=True)
class DatasetConfig:
    """A dataset preset (``dataset.*``, ``conf/dataset/``)."""

    name: str = result(MISSING)
    root: str = result(MISSING)  # relative roots are relative to the repository root (a resolved
    # Path once ``dataset_of`` has resolved it)
    builder: Optional[str] = neutral(None)  # materialise with datasets.builders.BUILDERS[builder]
    builder_args: Dict[str, Any] = result(factory=dict)
    num_classes: int = result(MISSING)
    manifest_dirs: List[str] = result(factory=lambda: ["."])
    published_missing: Optional[str] = result(None)  # e.g. "{stem}_{rate}.json": published missing draws
    image: ImageSize = result(MISSING)
    crop: Optional[int] = result(None)  # square crop fed to the network: random in training, centred at test
    backbone: str = result("small_cnn")
    mean: List[float] = result(MISSING)
    std: List[float] = result(MISSING)
    augment: Dict[str, Any] = result(factory=dict)  # datasets.source.Augment's fields
    # how data is held or read: a streamed run may reuse the predictions of an in-memory one
    # (streamed batches draw their augmentation per sample: the same distribution, other draws)
    cache: bool = neutral(True)  # decode into memory once; false: stream from disk
    memory_limit_mb: float = neutral(2048.0)  # stream when decoded train + test images exceed this
    workers: int = neutral(0)  # streamed data: Grain worker processes
    missing_seed: Optional[int] = result(None)  # None: the run seed draws the missing annotations
    held_out_experts: List[int] = result(factory=list)  # experts trained on by context only
    held_out_context: int = result(32)  # training annotations a held-out expert keeps (its context set)
    expert_cost: List[float] = result(factory=list)  # per-expert consultation cost; [] = 0
    train: SplitManifests = result(MISSING)
    test: SplitManifests = result(MISSING)

    def __post_init__(self):
        require(self.num_classes >= 2, "dataset.num_classes", ">= 2", self.num_classes)
        require(self.crop is None or self.crop >= 1, "dataset.crop", "null or >= 1", self.crop)
        require(self.workers >= 0, "dataset.workers", ">= 0", self.workers)
        require(finite(self.memory_limit_mb) and self.memory_limit_mb >= 0, "dataset.memory_limit_mb",
                ">= 0", self.memory_limit_mb)
        require(self.missing_seed is None or self.missing_seed >= 0, "dataset.missing_seed",
                "null or >= 0", self.missing_seed)
        channels = self.image.channels
        require(len(self.mean) == channels and len(self.std) == channels, "dataset.mean/std",
                f"{channels} values each (one per image channel)", (list(self.mean), list(self.std)))
        require(len(self.train.experts) >= 1, "dataset.train.experts",
                "at least one expert manifest (a system that defers needs an expert to defer to)",
                list(self.train.experts))
        require(all(finite(v) and v > 0 for v in self.std), "dataset.std",
                "finite and > 0 (images are divided by it)", list(self.std))
        experts = len(self.train.experts)
        require(len(set(self.held_out_experts)) == len(self.held_out_experts) < experts
                and all(0 <= j < experts for j in self.held_out_experts), "dataset.held_out_experts",
                f"distinct expert indices in [0, {experts}), leaving at least one expert to train on",
                list(self.held_out_experts))
        require(self.held_out_context >= 0, "dataset.held_out_context", ">= 0", self.held_out_context)
        require(len(self.expert_cost) in (0, experts) and all(finite(c) and c >= 0 for c in self.expert_cost),
                "dataset.expert_cost", f"empty (no cost) or {experts} finite values >= 0, one per expert",
                list(self.expert_cost))
        unknown = sorted(set(self.augment) - {f.name for f in dataclasses.fields(Augment)})
        require(not unknown, "dataset.augment", "a subset of crop_padding, hflip, noise_std",
                dict(self.augment))

    def __hash__(self) -> int:  # memoised data loading keys on the dataset
        return hash(repr(self))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image.height, self.image.width, self.image.channels)

    def task_spec(self) -> TaskSpec:
        """The static task description (experts counted from the training manifests)."""
        height, width, channels = self.image_shape
        shape = self.image_shape if self.crop is None else (self.crop, self.crop, channels)
        return TaskSpec(self.num_classes, len(self.train.experts), shape, self.backbone,
                        tuple(float(c) for c in self.expert_cost))

    def loader(self, batch_size: int) -> LoaderConfig:
        """The training loader configuration."""
        return LoaderConfig(batch_size=batch_size, mean=tuple(self.mean), std=tuple(self.std),
                            augment=Augment(**self.augment), drop_remainder=True,
                            crop=self.crop, workers=self.workers)


@dataclass
class TrackingConfig:
    """MLflow tracking (``tracking.*``, ``conf/tracking/``)."""

    enabled: bool = neutral(False)
    uri: Optional[str] = neutral(None)
    experiment: Optional[str] = neutral(None)
    artifact_location: Optional[str] = neutral(None)


@dataclass
class CellConfig:
    """One grid cell's whole configuration, as Hydra composes it (``conf/config.yaml``)."""

    dataset: DatasetConfig = section(MISSING)
    method: Any = section(MISSING)  # method=<name>: {name, label, params}, generated per method
    workload: WorkloadConfig = section(MISSING)
    tracking: TrackingConfig = section(factory=TrackingConfig)
    train: TrainConfig = section(factory=TrainConfig)
    eval: EvalConfig = section(factory=EvalConfig)
    seed: int = result(0)
    missing_rate: float = result(0.0)
    force: bool = neutral(False)  # redo cells whose result already exists
    objective: Optional[str] = neutral(None)  # experiment=tune: the record value a run returns
    # sweeps over policies; the runner sets it on methods that support it (method.params)
    missing_policy: Optional[str] = neutral(None)
    tuned_dir: str = neutral("conf/tuned")  # the tuned values applied are in train.*, method.params
    seeds_per_program: int = training(1)  # >1: blocks of this many seeds train as one vmapped program
    experiment_name: str = neutral("single")
    output_dir: str = neutral("outputs")
    results_dir: str = neutral(MISSING)
    report_dir: str = neutral(MISSING)
    cache_dir: str = neutral(MISSING)  # trained models' outputs
    data_cache_dir: str = neutral(MISSING)  # derived data (missing-annotation manifests, decoded images)
    jax_cache_dir: Optional[str] = neutral(None)  # JAX's persistent compilation cache; null: off

    def __post_init__(self):
        require(self.seed >= 0, "seed", ">= 0", self.seed)
        require(finite(self.missing_rate) and 0 <= self.missing_rate <= 1, "missing_rate",
                "in [0, 1]", self.missing_rate)
        require(self.seeds_per_program >= 1, "seeds_per_program", ">= 1", self.seeds_per_program)


# ----------------------------------------------------------------------------- Hydra


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


def register_configs() -> None:
    """Store the schema (``cell_schema``) and ``method=<name>`` for every registered method
    in Hydra's ConfigStore.

    A method node is ``{name, label, params}``: ``params`` is typed from the dataclass, so an
    unknown option or a wrong type fails when Hydra composes the config; ``label`` (optional)
    names the variant in reports instead of the generated label (it only renames: neutral);
    the name and every option are ``result`` settings.
    """
    load_all()
    store = ConfigStore.instance()
    store.store(name="cell_schema", node=CellConfig)
    for name in METHODS.names():
        options = method_params_schema(METHODS.get(name))
        node = dataclasses.make_dataclass(
            f"{METHODS.get(name).__name__}Config",
            [("name", str, result(name)),
             ("label", Optional[str], neutral(None)),
             ("params", options, result(factory=options))],
        )
        store.store(group="method", name=name, node=node)
        METHOD_NODES[name] = node


METHOD_NODES: dict[str, type] = {}  # method name -> its generated {name, label, params} node


def typed_method_node(cfg: DictConfig) -> DictConfig:
    """``cfg`` with its method node typed again when a launcher's pickled config lost the
    node's type (submitit, joblib): merged into the registered method's node, so unknown
    options are still refused and the options are the method's dataclass again."""
    method = cfg.get("method")
    if not isinstance(method, DictConfig):
        return cfg
    if not METHOD_NODES:  # a launcher's worker process that never ran the entry point's imports
        register_configs()
    node = METHOD_NODES.get(str(method.get("name")))
    if node is None or OmegaConf.get_type(method) is node:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg["method"] = OmegaConf.merge(OmegaConf.structured(node), OmegaConf.to_container(method))
    return cfg


def to_cell(cfg: DictConfig) -> CellConfig:
    """The composed config as the typed ``CellConfig`` (its ``hydra`` node left out); the
    one conversion of a cell. ``ConfigError`` names an option out of range."""
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    cfg = typed_method_node(cfg)
    check_known_options(cfg)
    cell = OmegaConf.to_object(cfg)
    if not isinstance(cell, CellConfig):
        raise ConfigError("the configuration does not start from cell_schema (conf/config.yaml)")
    return cell


def check_known_options(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming every key of a composed config that no schema declares."""
    unknown = [key for key in unknown_options(cfg) if key != "hydra"]
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)}: no such setting (a key added with + must "
            "still be one the schema declares; `./run.sh --cfg job` lists every option).")


def unknown_options(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``node`` that its schema dataclass does not declare (added with ``+``,
    which Hydra allows on typed nodes; they would be dropped without a word). Free-form
    mappings (``dataset.builder_args``, ``dataset.augment``) are not walked."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    declared = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in node.keys():
        if key not in declared:
            found.append(prefix + str(key))
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found += unknown_options(child, f"{prefix}{key}.")
    return found


def method_params(cell: CellConfig) -> dict[str, Any]:
    """The method's options as a dict (what ``method.params`` sets)."""
    params = cell.method.params
    return dict(params) if isinstance(params, dict) else dataclasses.asdict(params)


def with_method_option(cell: CellConfig, option: str, value: Any) -> CellConfig:
    """``cell`` with ``method.params.<option> = value`` (e.g. a swept ``missing_policy``)."""
    params = cell.method.params
    params = ({**params, option: value} if isinstance(params, dict)
              else dataclasses.replace(params, **{option: value}))
    return dataclasses.replace(cell, method=dataclasses.replace(cell.method, params=params))


def build_method(name: str, params: dict[str, Any], spec: TaskSpec) -> Method:
    """Instantiate the registered method ``name`` with ``params`` and the task's fields."""
    cls = get_method_class(name)
    options = method_options(cls)
    unknown = sorted(set(params) - set(options))
    if unknown:
        raise ConfigError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; "
            f"its options are {', '.join(sorted(options)) or '(none)'}."
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    task = {"num_experts": spec.num_experts, "num_classes": spec.num_classes,
            "expert_cost": spec.expert_cost}
    try:
        return cls(**{**params, **{k: v for k, v in task.items() if k in fields}})
    except MethodConfigError as err:
        raise ConfigError(str(err)) from None


# ----------------------------------------------------------------------------- a cell's run


def dataset_of(cell: CellConfig, base: Path) -> DatasetConfig:
    """The cell's dataset with its root resolved against ``base`` (the repository root)."""
    root = resolve_path(cell.dataset.root, base)
    return dataclasses.replace(cell.dataset, root=cast(str, root))  # a Path from here on (see DatasetConfig.root)


@dataclass(frozen=True)
class RunConfig:
    """Everything one grid cell needs, derived once from its ``CellConfig``."""

    cell: CellConfig
    dataset: DatasetConfig  # root resolved, missing_seed resolved (never None)
    missing_seed_source: str  # "run seed" or "dataset.missing_seed"
    spec: TaskSpec
    method: Method
    bounds: WorkloadBounds
    results_dir: Path
    cache_dir: Path  # trained models' test predictions
    data_cache_dir: Path  # derived data: missing-annotation manifests, decoded images
    identity: CellIdentity | None = None  # the runner's (its cache keys); None: not derived

    @classmethod
    def build(cls, cell: CellConfig, base: Path, identity: CellIdentity | None = None) -> "RunConfig":
        """Resolve the paths, the task, the method and the workload bounds of ``cell``;
        ``ConfigError`` names a bad option. ``identity`` is the cell's ``CellIdentity``
        (built by the runner: its labels need Hydra's chosen presets)."""
        dataset, source = dataset_of(cell, base), "dataset.missing_seed"
        if dataset.missing_seed is None:  # by default the run seed also draws the missing pattern
            dataset, source = dataclasses.replace(dataset, missing_seed=cell.seed), "run seed"
        spec = dataset.task_spec()
        data_cache_dir = resolve_path(cell.data_cache_dir, base)
        cache_dir = resolve_path(cell.cache_dir, base)
        for option, folder in (("data_cache_dir", data_cache_dir), ("cache_dir", cache_dir)):
            require(not inside_folder(folder, Path(dataset.root)), option,
                    f"outside the dataset root {dataset.root} (nothing is written into a dataset)",
                    str(folder))
        return cls(
            cell=cell, dataset=dataset, missing_seed_source=source, spec=spec,
            method=build_method(str(cell.method.name), method_params(cell), spec),
            bounds=cell.workload.bounds(spec.num_experts),
            results_dir=resolve_path(cell.results_dir, base),
            cache_dir=cache_dir, data_cache_dir=data_cache_dir, identity=identity,
        )

    def with_seed(self, seed: int, base: Path) -> "RunConfig":
        """This cell under another seed (seeds trained in one program)."""
        return RunConfig.build(dataclasses.replace(self.cell, seed=seed), base,
                               self.identity.with_seed(seed) if self.identity else None)

    # the cell's settings under the names the trainer and the cache use
    seed = property(lambda self: self.cell.seed)
    missing_rate = property(lambda self: self.cell.missing_rate)
    train = property(lambda self: self.cell.train)
    force = property(lambda self: self.cell.force)
    seeds_per_program = property(lambda self: self.cell.seeds_per_program)
    validation_fraction = property(lambda self: self.cell.eval.validation_fraction)
    validation_seed = property(lambda self: self.cell.eval.validation_seed)
    assignment_batch = property(lambda self: self.cell.eval.assignment_batch)
