"""``l2d_pop``: learning to defer to a population (Tailor, Patra, Verma, Manggala &
Nalisnick, AISTATS 2024, "Learning to Defer to a Population: A Meta-Learning Approach"),
the model-based (neural-process) variant with cross-attention.

No expert has a head of its own. One correctness head scores any expert from an embedding
of a few of that expert's answers, its *context set* ``D_j = {(x_c, y_c, t_jc)}``, so one
model serves experts it was not trained on: give it a new expert's context set and it
defers to that expert where the expert's answers on similar inputs were right.

* Features ``phi(x)`` from one backbone; K class logits from a linear head.
* Each context pair is encoded as ``v_c = tanh(MLP([norm(phi(x_c)), onehot(t_jc),
  onehot(y_c), onehot(y_c) * (2 r_c - 1), r_c]))`` with ``r_c = 1[t_jc = y_c]`` and ``norm``
  a parameter-free layer normalisation. For a query x the expert's summary is the
  cross-attention read-out ``a = sum_c softmax_c(8 cos(q(x), k(x_c))) v_c`` (``attention=
  false``: left out) and the mean ``m`` of the ``v_c``.
* The expert's logit is ``MLP(norm([norm(phi(x)), a, m])) + s * logit(acc)``: ``s`` a
  learned scale (starts at 1) and ``acc`` the expert's accuracy on x's class as the context
  shows it (per class, its right answers plus one pseudo-answer at its overall context
  accuracy, over its answers plus one; averaged under the classifier's class
  probabilities, held fixed). This read-out of the context in label space lets the head
  work within a few epochs (without it, digits needed far more steps than the OvA heads);
  the learned part refines it from the inputs. Bounded codes, cosine attention and the
  normalised head input keep plain SGD stable up to learning rate 0.2 (unbounded, the
  head diverged on digits at the tuned rates).
* Loss: the multi-expert ``softmax`` (default) or ``ova`` surrogate on the K class logits
  and the E context-conditioned expert logits (``methods.surrogates``).

Context sets come only from annotations an expert gave, so missing annotations never enter
them. In training, a sample's context for expert j is up to ``context_size`` other samples
of the same batch that j annotated (batches are shuffled: a fresh random set each step, the
sample itself left out). The correctness head reads the backbone's features under
``stop_gradient``: the backbone learns from the surrogate's class terms only (the head's
gradients through it made training diverge on digits). Training also keeps, per expert,
the last ``context_size`` annotated training samples it saw (``ContextMemory``; an expert
with few annotations, such as a held-out expert known by a few answers, keeps all it has);
these are the context sets at test time.
Missing policies: ``mask`` (default: a missing expert's term leaves the loss; under the
softmax surrogate its logit also leaves the row's softmax, as in ``two_stage``, so a
held-out expert is not taught to be wrong where it gave no answer), ``as_incorrect``,
``drop``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from core.spec import MISSING
from methods import METHODS
from methods.common import MethodBase, MethodConfigError, check_surrogate, require_experts
from methods.nets import BACKBONES
from methods.surrogates import MULTI_EXPERT_SURROGATES as SURROGATES


class ContextMemory(nnx.BatchStat):
    """Context pairs that training keeps for test time (state, never a parameter)."""


PRIOR_WEIGHT = 1.0  # pseudo-samples of an expert's overall accuracy in each class's estimate
MASKED_LOGIT = -1e9  # a missing expert's logit under softmax "mask": out of the row's softmax
ATTENTION_SHARPNESS = 8.0  # attention logits are this times the query-key cosine


def unit(v: jax.Array) -> jax.Array:
    """``v`` scaled to unit length along its last axis."""
    return v / jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True) + 1e-12)


def batch_context(observed: jax.Array, size: int) -> jax.Array:
    """(B, E, B) bool: ``[i, j, k]`` when sample k is in sample i's context for expert j:
    k != i, j annotated k, and k is among the first ``size`` such samples of the batch."""
    rows = jnp.arange(observed.shape[0])
    rank = jnp.cumsum(observed, axis=0) - 1  # (B, E): place among j's annotated samples
    after_self = observed[:, :, None] & (rows[:, None, None] < rows[None, None, :])
    rank_without_self = rank.T[None] - after_self  # one place earlier once i is left out
    other = rows[:, None, None] != rows[None, None, :]
    return observed.T[None] & other & (rank_without_self < size)


def attend(logits: jax.Array, mask: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked attention and mean read-outs, both (B, E, H): ``logits`` and ``mask`` (B, E, C),
    ``values`` (E, C, H); an empty context reads out zeros."""
    top = jnp.max(jnp.where(mask, logits, -1e30), axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(jnp.where(mask, logits, top) - top), 0.0)
    weights = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-12)
    share = mask / jnp.maximum(mask.sum(axis=-1, keepdims=True), 1)
    return (jnp.einsum("bec,ech->beh", weights, values),
            jnp.einsum("bec,ech->beh", share, values))


def context_accuracy(class_probs: jax.Array, t: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, E) each expert's accuracy on a query's class as its context set shows it: per
    class c, ``(right on c + w a) / (seen on c + w)`` with ``a`` the (Laplace-smoothed)
    accuracy over the whole context and ``w = PRIOR_WEIGHT``, averaged under the query's
    ``class_probs`` (B, K); ``t``, ``y`` (E, C) and ``mask`` (B, E, C) as in ``attend``."""
    label = jax.nn.one_hot(y, class_probs.shape[-1])  # (E, C, K)
    right = (t == y).astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    seen = jnp.einsum("bec,eck->bek", mask, label)
    right_on = jnp.einsum("bec,eck->bek", mask, label * right[..., None])
    overall = (jnp.einsum("bec,ec->be", mask, right) + 1.0) / (mask.sum(axis=-1) + 2.0)
    per_class = (right_on + PRIOR_WEIGHT * overall[..., None]) / (seen + PRIOR_WEIGHT)
    return jnp.einsum("bk,bek->be", class_probs, per_class)


class PopulationNetwork(nnx.Module):
    """Backbone, class head, context encoder, attention and the shared correctness head,
    plus the context memory (E experts x ``context`` slots)."""

    def __init__(self, spec, context: int, hidden: int, attention: bool, *, rngs: nnx.Rngs):
        height, width, channels = spec.input_shape
        num_classes, num_experts = spec.num_classes, spec.num_experts
        self.backbone = BACKBONES.get(spec.backbone)(channels, rngs=rngs)
        features = self.backbone.features
        self.classifier = nnx.Linear(features, num_classes, rngs=rngs)
        # parameter-free normalisations keep every input of the heads at unit scale
        self.normalise = nnx.LayerNorm(features, use_scale=False, use_bias=False, rngs=rngs)
        self.encode_in = nnx.Linear(features + 3 * num_classes + 1, hidden, rngs=rngs)
        self.encode_out = nnx.Linear(hidden, hidden, rngs=rngs)
        self.query = nnx.Linear(features, hidden, rngs=rngs)
        self.key = nnx.Linear(features, hidden, rngs=rngs)
        self.head_norm = nnx.LayerNorm(features + 2 * hidden, use_scale=False, use_bias=False, rngs=rngs)
        self.head_in = nnx.Linear(features + 2 * hidden, hidden, rngs=rngs)
        self.head_out = nnx.Linear(hidden, 1, rngs=rngs)
        self.prior_scale = nnx.Param(jnp.ones(()))  # weight of the context-accuracy logit
        self.num_classes, self.attention = num_classes, attention
        self.memory_x = ContextMemory(jnp.zeros((num_experts, context, height, width, channels)))
        self.memory_t = ContextMemory(jnp.zeros((num_experts, context), jnp.int32))
        self.memory_y = ContextMemory(jnp.zeros((num_experts, context), jnp.int32))
        self.memory_filled = ContextMemory(jnp.zeros((num_experts,), jnp.int32))
        self.memory_next = ContextMemory(jnp.zeros((num_experts,), jnp.int32))

    def encode(self, features: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        """(..., H) codes of context pairs: features (..., D), answers t and labels y (...)."""
        right = (t == y)[..., None]
        label = jax.nn.one_hot(y, self.num_classes)
        pair = jnp.concatenate([self.normalise(features), jax.nn.one_hot(t, self.num_classes), label,
                                label * (2.0 * right - 1.0), right], axis=-1)
        return jnp.tanh(self.encode_out(nnx.gelu(self.encode_in(pair))))

    def expert_logits(self, features, context_features, t, y, mask, class_logits) -> jax.Array:
        """(B, E) correctness logits of queries ``features`` (B, D) given the experts' context
        pairs (``context_features`` (E, C, D), answers ``t`` and labels ``y`` (E, C)) and
        ``mask`` (B, E, C) marking each query's context."""
        values = self.encode(context_features, t, y)  # (E, C, H)
        features, context_features = self.normalise(features), self.normalise(context_features)
        query, key = unit(self.query(features)), unit(self.key(context_features))
        logits = ATTENTION_SHARPNESS * jnp.einsum("bh,ech->bec", query, key)  # scaled cosines
        attended, mean = attend(logits, mask, values)
        if not self.attention:
            attended = jnp.zeros_like(attended)
        own = jnp.broadcast_to(features[:, None, :], (*mean.shape[:2], features.shape[-1]))
        summary = self.head_norm(jnp.concatenate([own, attended, mean], axis=-1))
        hidden = nnx.gelu(self.head_in(summary))
        class_probs = jax.nn.softmax(jax.lax.stop_gradient(class_logits), axis=-1)
        accuracy = jnp.clip(context_accuracy(class_probs, t, y, mask), 1e-4, 1.0 - 1e-4)
        return self.head_out(hidden)[..., 0] + self.prior_scale * jax.scipy.special.logit(accuracy)

    def remember(self, x: jax.Array, y: jax.Array, t: jax.Array) -> None:
        """Write each expert's first annotated samples of the batch (up to the memory's
        size) over its oldest memory slots."""
        num_experts, context = self.memory_t.shape
        observed = t != MISSING
        rank = jnp.cumsum(observed, axis=0) - 1  # (B, E)
        taken = observed & (rank < context)
        slot = jnp.where(taken, (self.memory_next[...][None, :] + rank) % context, context)
        expert = jnp.broadcast_to(jnp.arange(num_experts)[None, :], slot.shape)
        pixels = jnp.broadcast_to(x[:, None], (x.shape[0], num_experts, *x.shape[1:]))
        self.memory_x[...] = self.memory_x[...].at[expert, slot].set(pixels, mode="drop")
        self.memory_t[...] = self.memory_t[...].at[expert, slot].set(t, mode="drop")
        labels = jnp.broadcast_to(y[:, None], slot.shape)
        self.memory_y[...] = self.memory_y[...].at[expert, slot].set(labels, mode="drop")
        count = taken.sum(axis=0).astype(jnp.int32)
        self.memory_filled[...] = jnp.minimum(self.memory_filled[...] + count, context)
        self.memory_next[...] = (self.memory_next[...] + count) % context


@METHODS.register("l2d_pop")
@dataclasses.dataclass(frozen=True)
class PopulationL2D(MethodBase):
    missing_policies = ("mask", "as_incorrect", "drop")
    num_experts: int = 0
    missing_policy: str = "mask"
    surrogate: str = "softmax"  # softmax | ova (methods.surrogates)
    context_size: int = 32  # context pairs per expert, in training and at test time
    hidden: int = 64  # width of the context codes and the correctness head
    attention: bool = True  # false: the mean of the context codes only (no cross-attention)

    def __post_init__(self):
        super().__post_init__()
        check_surrogate(self.name, self.surrogate, self.surrogate_policy, SURROGATES)
        for option in ("context_size", "hidden"):
            if getattr(self, option) < 1:
                raise MethodConfigError(f"method {self.name!r}: {option} must be >= 1, "
                                        f"got {getattr(self, option)}.")

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        return PopulationNetwork(spec, self.context_size, self.hidden, self.attention, rngs=rngs)

    def loss(self, model, batch, inputs):
        features = model.backbone(batch.x)
        mask = batch_context(batch.t != MISSING, self.context_size)  # (B, E, B)
        context_t = batch.t.T  # (E, B)
        context_y = jnp.broadcast_to(batch.y[None, :], context_t.shape)
        fixed = jax.lax.stop_gradient(features)  # the backbone learns from the classifier
        context_features = jnp.broadcast_to(fixed[None], (self.num_experts, *features.shape))
        class_logits = model.classifier(features)
        expert_logits = model.expert_logits(fixed, context_features, context_t, context_y, mask,
                                            class_logits)
        model.remember(batch.x, batch.y, batch.t)
        if self.missing_policy == "mask" and self.surrogate == "softmax":
            # a missing expert leaves the row's softmax (its answer is then no target either)
            expert_logits = jnp.where(batch.t != MISSING, expert_logits, MASKED_LOGIT)
        logits = jnp.concatenate([class_logits, expert_logits], axis=-1)
        return SURROGATES[self.surrogate][0](logits, batch.y, batch.t, self.surrogate_policy), {}

    @property
    def surrogate_policy(self) -> str:
        """The surrogate's own policy: softmax "mask" is "as_incorrect" on masked logits."""
        softmax_mask = self.missing_policy == "mask" and self.surrogate == "softmax"
        return "as_incorrect" if softmax_mask else self.missing_policy

    def logits(self, model, x):
        """(B, K + E): class logits, then each expert's logit given its remembered context."""
        features = model.backbone(x)
        memory = model.memory_x[...]
        num_experts, context = memory.shape[:2]
        context_features = model.backbone(memory.reshape(-1, *memory.shape[2:]))
        context_features = context_features.reshape(num_experts, context, -1)
        filled = jnp.arange(context)[None, :] < model.memory_filled[...][:, None]  # (E, C)
        mask = jnp.broadcast_to(filled[None], (x.shape[0], num_experts, context))
        class_logits = model.classifier(features)
        expert_logits = model.expert_logits(features, context_features, model.memory_t[...],
                                            model.memory_y[...], mask, class_logits)
        return jnp.concatenate([class_logits, expert_logits], axis=-1)

    def classify(self, model, x):
        return model.classifier(model.backbone(x))

    def class_probabilities(self, model, x):
        logits = self.classify(model, x)
        return jax.nn.sigmoid(logits) if self.surrogate == "ova" else jax.nn.softmax(logits, axis=-1)

    def agent_scores(self, model, x):
        return SURROGATES[self.surrogate][1](self.logits(model, x), self.num_experts)
