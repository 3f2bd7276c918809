"""The contract of l2d-bench: what every method, loader and evaluator agrees on.

Agents are indexed ``0..E-1`` for the E human experts and ``E`` for the classifier
(the classifier is last). A missing expert annotation is encoded as ``MISSING`` (-1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

MISSING = -1


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

    @property
    def num_agents(self) -> int:
        return self.num_experts + 1


@dataclasses.dataclass(frozen=True)
class WorkloadBounds:
    """Per-agent bounds on the share of samples routed to each agent, in agent order."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]


@runtime_checkable
class Method(Protocol):
    """What every registered L2D method provides.

    A method object is a frozen dataclass of hyper-parameters (hashable: it is passed to
    ``jax.jit`` as a static argument, never ``self`` closed over arrays). All arrays live
    in the Flax NNX model it builds. The shared trainer (``benchmark.training``) owns the
    optimiser and the loop; the evaluator turns ``agent_scores`` into decisions.
    """

    name: str

    def init_model(self, spec: TaskSpec, rngs: Any) -> Any:
        """Build the NNX model (all networks of the method) from ``nnx.Rngs``."""

    def loss(self, model: Any, batch: Batch, aux: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar training loss and a dict of scalar metrics; pure and jittable.

        ``aux`` carries traced per-run inputs that are not hyper-parameters (for example
        workload bounds as arrays); methods that need none ignore it.
        """

    def classify(self, model: Any, x: jax.Array) -> jax.Array:
        """(B, K) class logits of the method's classifier."""

    def agent_scores(self, model: Any, x: jax.Array) -> jax.Array:
        """(B, E+1) scores, higher = better choice of agent (classifier last)."""
