"""The contract of l2d-bench: what every method, loader, runner and report agrees on.

Agents are indexed ``0..E-1`` for the E human experts and ``E`` for the classifier
(the classifier is last). A missing expert annotation is encoded as ``MISSING`` (-1).

**Score scale.** ``Method.agent_scores`` returns, per sample and agent, a probability in
[0, 1] that routing the sample to that agent gives a correct answer (a method's estimate:
a gating probability, a calibrated correctness probability, a softmax share). Higher is
better. Decisions are the argmax, or the capacity-constrained assignment that maximises
``ASSIGNMENT_OBJECTIVE``: the sum of the chosen agents' scores over the test set (the
expected number of correct answers). The runner rejects scores outside [0, 1].
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple, Protocol, TypedDict, runtime_checkable

import jax

from core.registry import did_you_mean

MISSING = -1
SCORE_RANGE = (0.0, 1.0)
ASSIGNMENT_OBJECTIVE = "maximise the sum over samples of agent_scores[i, agent(i)]"


def target_count(share: float, num_samples: int) -> int:
    """The whole number of samples a target share of ``num_samples`` stands for:
    ``round(share * N)``, halves rounded up (e.g. a coverage target; the same rule on every
    split, for the evaluator and for methods alike)."""
    return int(math.floor(share * num_samples + 0.5 + 1e-9 * max(num_samples, 1)))


def agent_names(num_experts: int) -> list[str]:
    """Human-readable agent names in agent order: ``expert_0..expert_{E-1}, classifier``."""
    return [f"expert_{j}" for j in range(num_experts)] + ["classifier"]


class Batch(NamedTuple):
    """One batch (a pytree).

    x: (B, H, W, C) float32 images, normalised.
    y: (B,) int32 ground-truth class.
    t: (B, E) int32 expert annotations, ``MISSING`` where the expert did not annotate.
    """

    x: jax.Array
    y: jax.Array
    t: jax.Array


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Static description of a task (hashable, usable as a jit static argument)."""

    num_classes: int
    num_experts: int
    input_shape: tuple[int, int, int]  # (H, W, C)
    backbone: str = "small_cnn"
    expert_cost: tuple[float, ...] = ()  # per-expert consultation cost (dataset.expert_cost); () = 0

    @property
    def num_agents(self) -> int:
        return self.num_experts + 1


@dataclasses.dataclass(frozen=True)
class WorkloadBounds:
    """Per-agent bounds on the share of samples routed to each agent, in agent order."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]


class UndeclaredBoundsError(RuntimeError):
    """A method read workload bounds in training without declaring ``workload_in_training``."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainInputs:
    """Per-step inputs of ``Method.loss`` that are not hyper-parameters (a pytree of arrays).

    progress: scalar float32, the fraction of training done (0 at the first step).
    lo, hi: (E+1,) float32 workload bounds, present only for methods that declare
    ``workload_in_training = True`` (read them through ``bounds``).
    """

    progress: jax.Array
    lo: jax.Array | None = None
    hi: jax.Array | None = None

    @property
    def bounds(self) -> tuple[jax.Array, jax.Array]:
        """``(lo, hi)``; raises ``UndeclaredBoundsError`` if the method did not declare them."""
        if self.lo is None or self.hi is None:
            raise UndeclaredBoundsError(
                "this method reads the workload bounds in training but does not declare "
                "`workload_in_training = True`; declare it so that its predictions are "
                "trained once per workload instead of reused across workloads."
            )
        return self.lo, self.hi


@runtime_checkable
class Method(Protocol):
    """The learning hooks of every registered L2D method.

    A method object is a frozen dataclass of hyper-parameters (hashable: it is passed to
    ``jax.jit`` as a static argument, never ``self`` closed over arrays). Its registered
    name (which the registry sets as ``name``) and field defaults are its whole definition:
    the Hydra config ``method=<name>`` is generated from them. Fields named in
    ``TASK_FIELDS`` are filled from the task by the runner. All arrays live in the Flax NNX
    model it builds. The shared trainer (``benchmark.training``) owns the optimiser and the
    loop; the evaluator turns ``agent_scores`` into decisions. The defaults of the optional
    members are written once, in ``methods.common.MethodBase``.
    """

    name: ClassVar[str]  # the registered name (set by the registry)
    trains: ClassVar[bool]  # False: no gradient step (e.g. best_expert)
    # True: the loss reads inputs.bounds, so the method trains once per workload (a class
    # attribute, or a property where an option decides it, as prob_l2d's)
    workload_in_training: ClassVar[bool]
    missing_policies: ClassVar[tuple[str, ...]]  # accepted ``missing_policy`` values; () = any
    # Methods naming the same training problem (same parameters, loss and data; e.g. the
    # cross-entropy classifier of three reference rows) train once and share the trained
    # parameters; None: the method trains on its own.
    training_problem: ClassVar[str | None]

    def init_model(self, spec: TaskSpec, rngs: Any) -> Any:
        """Build the NNX model (all networks of the method) from ``nnx.Rngs``."""

    def prepare(self, model: Any, train_split: Any) -> None:
        """Run once before training with the in-memory training split (``.x, .y, .t``).

        Default: nothing.
        """

    def loss(self, model: Any, batch: Batch, inputs: TrainInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar training loss and a dict of scalar metrics; pure and jittable."""

    def classify(self, model: Any, x: jax.Array) -> jax.Array:
        """(B, K) class logits of the method's classifier."""

    def agent_scores(self, model: Any, x: jax.Array) -> jax.Array:
        """(B, E+1) scores in [0, 1] on the scale stated in this module's docstring."""

    def class_probabilities(self, model: Any, x: jax.Array) -> jax.Array:
        """(B, K) the classifier's class probabilities, for calibration metrics.

        Default: the softmax of ``classify`` (OvA overrides it with its sigmoids).
        """

    def impute(self, model: Any, batch: Batch, inputs: TrainInputs) -> jax.Array | None:
        """(B, E, K) inferred distribution of the experts' labels; default None (not modelled)."""

    def diagnostics(self, model: Any, batch: Batch, inputs: TrainInputs) -> dict[str, float]:
        """Extra run metrics measured once after training on one training batch, on the host
        (e.g. ``estep_ms``, Prob-L2D's E-step time per step). Default: none.
        """


@runtime_checkable
class ReferenceRow(Protocol):
    """A reference row (oracle, random, classifier-only, best expert): a ``Method`` that is a
    reference, not a competitor (never ranked), with a stated test-time rule. The evaluator
    applies the rule (``benchmark.evaluator.decision_scores``). Defaults:
    ``methods.common.ReferenceRowBase``."""

    sees_test_labels: ClassVar[bool]  # True only for the oracle: its rule reads y and t

    def reference_scores(self, logits: Any, scores: Any, y: Any, t: Any) -> Any:
        """(N, E+1) scores of a whole evaluation split (numpy, on the host) under the row's
        rule, before decisions: e.g. random deferral of an exact share of N. ``y`` and ``t``
        are the split's labels when ``sees_test_labels``, else None."""


@runtime_checkable
class ExpertCommittee(Protocol):
    """A method that, when it defers, consults a set of experts and outputs their vote
    (conformal_l2d). The evaluator consults ``expert_sets`` plus the decided expert, takes
    the plurality answer and charges the cost of every expert consulted."""

    def expert_sets(self, scores: Any, calibration: tuple[Any, Any, Any]) -> Any:
        """(N, E) bool: the experts consulted per sample of a split with (N, E+1) agent
        ``scores``, calibrated on ``calibration`` = (scores, y, t) of the validation split."""


LEARNED, REFERENCE = "method", "reference"  # a record's role: a competitor or a reference row


def role_of(method: Any) -> str:
    """``"reference"`` for a reference row, ``"method"`` for a competitor."""
    return REFERENCE if isinstance(method, ReferenceRow) else LEARNED


# ----------------------------------------------------------------------------- metrics


class MetricSpec(NamedTuple):
    """How to read a metric: which side is better (``"higher"``, ``"lower"`` or None for a
    description such as a workload share), the range of its values (None: unbounded), what
    it measures (one sentence, for the reports' data dictionary), and whether it describes
    the trained model whatever the decision rule (reports show it once, not per rule)."""

    direction: str | None
    low: float | None
    high: float | None
    meaning: str = ""
    decision_free: bool = False


HIGHER, LOWER = "higher", "lower"
# every metric a record can carry; a name ending in "/" is a prefix (workload/expert_0)
METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec(HIGHER, 0.0, 1.0, "share of test samples the system answers correctly"),
    "coverage": MetricSpec(None, 0.0, 1.0, "share of test samples sent to the classifier"),
    "workload/": MetricSpec(None, 0.0, 1.0, "share of test samples sent to this agent"),
    "workload_violation": MetricSpec(LOWER, 0.0, 1.0,
                                     "largest distance of an agent's share outside its bounds"),
    "human_workload_cv": MetricSpec(LOWER, 0.0, None,
                                    "coefficient of variation of the humans' shares (0: equal)"),
    "classifier_accuracy": MetricSpec(HIGHER, 0.0, 1.0, "accuracy of the classifier on every test sample",
                                      decision_free=True),
    "expert_accuracy/": MetricSpec(HIGHER, 0.0, 1.0, "accuracy of this expert's test annotations",
                                   decision_free=True),
    "classifier_ece": MetricSpec(LOWER, 0.0, 1.0, "expected calibration error of the classifier (15 bins)",
                                 decision_free=True),
    "deferral_auc": MetricSpec(HIGHER, 0.0, 1.0,
                               "area under one trained model's own score-ranking accuracy-coverage curve",
                               decision_free=True),
    "imputation_accuracy": MetricSpec(HIGHER, 0.0, 1.0,
                                      "accuracy of the inferred labels of withheld annotations"),
    "train_seconds": MetricSpec(LOWER, 0.0, None, "training wall time, compilation excluded (s)"),
    "compile_seconds": MetricSpec(LOWER, 0.0, None, "time of the first, compiling train step (s)"),
    "samples_per_second": MetricSpec(HIGHER, 0.0, None, "training samples per second"),
    "estep_ms": MetricSpec(LOWER, 0.0, None, "one jitted E-step + workload projection (ms)"),
    "num_devices": MetricSpec(None, 1.0, None, "devices the training ran on"),
    "cost_aware_accuracy": MetricSpec(HIGHER, None, 1.0,
                                      "accuracy minus the mean cost of the experts consulted per "
                                      "sample (dataset.expert_cost; equals accuracy at cost 0)"),
    "expert_set_size": MetricSpec(None, 0.0, None,
                                  "mean number of experts in a test sample's conformal expert set"),
}


def metric_spec(name: str) -> MetricSpec:
    """The ``MetricSpec`` of metric ``name`` (prefix entries match ``workload/expert_0``);
    ``KeyError`` with a "did you mean" hint for a name that is not registered."""
    if name in METRICS:
        return METRICS[name]
    for key, spec in METRICS.items():
        if key.endswith("/") and name.startswith(key) and len(name) > len(key):
            return spec
    hint = did_you_mean(name, METRICS)
    raise KeyError(f"unknown metric {name!r}.{hint} Registered: {', '.join(METRICS)}.")


# ----------------------------------------------------------------------------- methods

TASK_FIELDS = ("num_experts", "num_classes", "expert_cost")  # method fields the runner fills from the task
SEARCH = "search"  # field metadata key: the option's range for experiment=tune


def tunable(default: Any, low: float, high: float, *, log: bool = False) -> Any:
    """A method option that ``experiment=tune`` searches over [low, high] (log scale if
    ``log``); use as ``annotator_fraction: float = tunable(0.5, 0.05, 0.75)``."""
    return dataclasses.field(default=default, metadata={SEARCH: (low, high, log)})


# ----------------------------------------------------------------------------- result record

RECORD_SCHEMA = 2
RECORD_NAME = "result.json"


class Status(enum.StrEnum):
    """What running one grid cell came to (a record itself says ok or failed)."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"  # a cell whose ok record exists (nothing run, nothing written)
    NOT_APPLICABLE = "not_applicable"  # a swept missing_policy the method does not support


STATUSES = (Status.OK, Status.FAILED)  # what a record says
SKIPPED, NOT_APPLICABLE = Status.SKIPPED, Status.NOT_APPLICABLE


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one job of a sweep reports: its status, the cell (or the job's overrides when it
    has no identity), and the errors a summary shows. Written beside the job's Hydra files
    and read back from there (``core.records``), whatever process ran the job."""

    status: Status
    cell: dict[str, Any]
    error: str | None = None
    tracking_error: str | None = None
    tracked_again: bool = False  # a finished cell whose run was missing from the store

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> "Outcome":
        """The outcome of a record (or of the runner's skipped / not-applicable answer)."""
        return cls(status=Status(record["status"]), cell=dict(record.get("cell") or {}),
                   error=record.get("error"), tracking_error=record.get("tracking_error"),
                   tracked_again=bool(record.get("tracked_again")))

    def cell_text(self) -> str:
        """``key=value, ...`` of the cell."""
        return ", ".join(f"{k}={v}" for k, v in self.cell.items())


class CellKey(TypedDict):
    """Identity of a result row: one record per distinct value.

    ``dataset``, ``method`` and ``workload`` are variant labels: the preset or method name,
    plus every setting that differs from its default (``prob_l2d[estep=meanfield]``,
    ``paper[classifier.hi=0.3]``, ``digits@1a2b3c4d`` for changed dataset settings).
    Training settings that differ from the experiment's defaults join the method label.
    """

    dataset: str
    method: str
    missing_rate: float
    workload: str
    seed: int


CELL_KEYS = tuple(CellKey.__annotations__)


class ResultRecord(TypedDict, total=False):
    """One grid cell's result, written by the runner as ``result.json``.

    Read everywhere through ``core.records`` (which checks the schema).
    """

    schema: int  # RECORD_SCHEMA
    status: str  # Status.OK | Status.FAILED
    error: str | None
    traceback: str | None
    cell: CellKey
    method_name: str  # registered name of the method (the label's base)
    role: str  # "method" | "reference"
    variant: dict[str, Any]  # the non-default settings behind the labels
    identity: dict[str, dict[str, Any]]  # settings by role: {"result": {name: value}, "measure", "training"}
    fingerprint: str  # hash of every setting that defines the result
    agents: list[str]
    workload_bounds: dict[str, list[float]]  # {"lo": [...], "hi": [...]}
    metrics: dict[str, dict[str, float]]  # test set: {"argmax": {...}, "constrained": {...}}
    validation: dict[str, dict[str, float]]  # the same metrics on the held-out validation split
    correct: dict[str, str]  # per decision rule, "0"/"1" per test sample: answered correctly
    missing_seed: dict[str, Any]  # {"seed": int, "from": "run seed" | "dataset.missing_seed"}
    missing_annotations: dict[str, Any]  # {"source": "none" | "published" | "drawn", "observed_rate": float}
    run_metrics: dict[str, float | None]  # train_seconds, samples_per_second, ...
    history: list[dict[str, float]]  # training metrics (mean over the epoch's steps) per epoch
    curves: dict[str, list[float]]  # {"coverage": [...], "accuracy": [...]}
    provenance: dict[str, Any]
    mlflow_run_id: str | None
    tracking_error: str | None
    finished_at: str
    path: str  # set by the loader: the file the record was read from


def check_record(record: Any, where: str = "record") -> ResultRecord:
    """``record`` if it follows the schema, else ``ValueError`` prefixed by ``where``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a result record must be a JSON object")
    if record.get("schema") != RECORD_SCHEMA:
        raise ValueError(
            f"{where}: unsupported record schema {record.get('schema')!r} (this version reads "
            f"schema {RECORD_SCHEMA}; re-run the cell to rewrite it)"
        )
    cell = record.get("cell")
    if not isinstance(cell, dict) or any(key not in cell for key in CELL_KEYS):
        raise ValueError(f"{where}: 'cell' must hold {', '.join(CELL_KEYS)}")
    if record.get("status") not in STATUSES:
        raise ValueError(f"{where}: status must be 'ok' or 'failed', got {record.get('status')!r}")
    if record["status"] == "ok" and not isinstance(record.get("metrics"), dict):
        raise ValueError(f"{where}: a record with status 'ok' must hold 'metrics'")
    return record  # type: ignore[return-value]
