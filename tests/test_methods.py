"""Tests of every registered method (generic, from the contract) plus method-specific checks.

The generic tests are parametrised over ``METHODS.names()`` after ``methods.load_all()``, so
a newly registered method is tested without editing this file.
"""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import methods
from benchmark import config as config_lib
from benchmark import training
from benchmark.evaluator import final_predictions
from core.spec import MISSING, Batch, TaskSpec, TrainInputs, WorkloadBounds
from methods.missing_policy import POLICIES

methods.load_all()
NAMES = methods.METHODS.names()
CLASSES = {name: methods.METHODS.get(name) for name in NAMES}
TRAINED = [name for name in NAMES if CLASSES[name].trains]
IMPUTERS = {"prob_l2d", "impute_then_defer"}  # the methods with annotator models
K, E = 4, 2
SPEC = TaskSpec(num_classes=K, num_experts=E, input_shape=(8, 8, 1), backbone="small_cnn")
OPTIM = training.OptimConfig(learning_rate=0.05, total_steps=4)


def build(name, **params):
    """The method as the runner builds it (num_experts / num_classes filled in)."""
    return config_lib.build_method(name, params, SPEC)


def make_batch(size=16, seed=0, missing_expert=None, missing_rate=0.3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, size)
    t = np.where(rng.random((size, E)) < 0.6, y[:, None], rng.integers(0, K, (size, E)))
    t = np.where(rng.random((size, E)) < missing_rate, MISSING, t)
    if missing_expert is not None:
        t[:, missing_expert] = MISSING
    x = rng.normal(size=(size, *SPEC.input_shape))
    return Batch(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), jnp.asarray(t, jnp.int32))


def bounds(classifier_hi=0.5):
    """Workload bounds with an active cap on the classifier."""
    return WorkloadBounds(lo=(0.0,) * (E + 1), hi=(1.0,) * E + (classifier_hi,))


def make_inputs(method, progress=0.75, classifier_hi=0.5):
    """The trainer's ``TrainInputs`` (bounds only if the method declares them); second stage."""
    return training.train_inputs(method, bounds(classifier_hi), progress)


# every registered method, plus the variants of a method that build other networks
VARIANTS = [(name, {}) for name in NAMES] + [("prob_l2d", {"networks": "separate"}),
                                             ("prob_l2d", {"estep": "meanfield"}),
                                             ("prob_l2d", {"estep": "reference"})]


def run(method, seed=0, steps=2, batch=None, inputs=None):
    """Init (+ prepare) + ``steps`` train steps + predict; returns metrics, logits, scores, model."""
    batch = make_batch() if batch is None else batch
    inputs = make_inputs(method) if inputs is None else inputs
    model = training.init_model(method, SPEC, seed)
    method.prepare(model, SimpleNamespace(images=np.asarray(batch.x), y=np.asarray(batch.y),
                                          t=np.asarray(batch.t)))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = training.TrainState(params, rest, training.make_optimizer(OPTIM).init(params))
    history = []
    for _ in range(steps if method.trains else 0):
        state, metrics = training.train_step(method, graphdef, OPTIM, state, batch, inputs)
        history.append({k: float(v) for k, v in metrics.items()})
    model = nnx.merge(graphdef, state.params, state.rest)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    logits, probs, scores = training.predict(method, graphdef, params, rest, batch.x)
    probs = np.asarray(probs)
    assert probs.shape == (batch.x.shape[0], K) and probs.min() >= 0.0 and probs.max() <= 1.0
    return history, np.asarray(logits), np.asarray(scores), (graphdef, params, rest)


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating))


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name,params", VARIANTS)
def test_trains_predicts_and_is_deterministic(name, params):
    method = build(name, **params)
    history, logits, scores, (_, params_, _) = run(method, seed=0)
    assert len(history) == (2 if method.trains else 0)
    for metrics in history:
        assert "loss" in metrics and all(np.isfinite(v) for v in metrics.values()), metrics
    assert logits.shape == (16, K) and scores.shape == (16, E + 1)
    assert np.isfinite(logits).all() and np.isfinite(scores).all() and all_finite(params_)
    # the contract's score scale: probabilities in [0, 1]
    assert scores.min() >= 0.0 and scores.max() <= 1.0 + 1e-6, (scores.min(), scores.max())
    _, logits_again, scores_again, _ = run(build(name, **params), seed=0)
    np.testing.assert_array_equal(logits, logits_again)
    np.testing.assert_array_equal(scores, scores_again)


@pytest.mark.parametrize(
    "name,policy",
    [(n, p) for n in TRAINED for p in (CLASSES[n].missing_policies or (None,))],
)
def test_step_with_an_expert_missing_everywhere_stays_finite(name, policy):
    method = build(name) if policy is None else build(name, missing_policy=policy)
    batch = make_batch(missing_expert=0)
    history, logits, scores, (_, params, _) = run(method, steps=1, batch=batch)
    assert all(np.isfinite(v) for v in history[0].values()), history
    assert np.isfinite(logits).all() and np.isfinite(scores).all() and all_finite(params)


@pytest.mark.parametrize("name", NAMES)
def test_impute_is_none_or_label_distributions(name):
    """Methods with annotator models infer a distribution over each expert's label; the
    others say they do not model it (None)."""
    method = build(name)
    batch = make_batch()
    _, _, _, (graphdef, params, rest) = run(method, steps=0)
    q_t = training.impute_step(method, graphdef, params, rest, batch, make_inputs(method, 1.0))
    assert (q_t is not None) == (name in IMPUTERS)
    if q_t is not None:
        assert q_t.shape == (16, E, K)
        np.testing.assert_allclose(np.asarray(q_t).sum(-1), 1.0, atol=1e-5)
        assert float(np.min(q_t)) >= 0.0


@pytest.mark.parametrize("name", [n for n in NAMES if CLASSES[n].missing_policies])
def test_unsupported_policy_is_refused_with_the_valid_ones(name):
    cls = CLASSES[name]
    for policy in [p for p in POLICIES if p not in cls.missing_policies] + ["bogus"]:
        with pytest.raises(ValueError) as error:
            cls(missing_policy=policy)
        assert all(valid in str(error.value) for valid in cls.missing_policies), str(error.value)
    for policy in cls.missing_policies:
        cls(missing_policy=policy)  # every declared policy is accepted


# ----------------------------------------------------------------------------- specific methods


def test_best_expert_picks_the_most_accurate_expert():
    y = np.arange(100) % K
    t = np.stack([np.where(np.arange(100) < 10, y, MISSING),  # 10 labels, all right
                  np.where(np.arange(100) < 70, y, (y + 1) % K)], axis=1)  # 100 labels, 70% right
    split = SimpleNamespace(y=y, t=t)
    for policy, expected in (("mask", 0), ("as_incorrect", 1)):
        method = build("best_expert", missing_policy=policy)
        model = training.init_model(method, SPEC, 0)
        method.prepare(model, split)
        scores = np.asarray(method.agent_scores(model, make_batch().x))
        assert (scores.argmax(axis=1) == expected).all(), policy


def test_oracle_is_correct_whenever_some_agent_is():
    rng = np.random.default_rng(1)
    n = 500
    y = rng.integers(0, K, n)
    t = np.where(rng.random((n, E)) < 0.4, y[:, None], (y[:, None] + 1) % K)
    logits = rng.normal(size=(n, K))
    method = build("oracle")
    scores = method.reference_scores(logits, np.zeros((n, E + 1)), y, t)
    agent = scores.argmax(axis=1)
    correct = final_predictions(agent, logits.argmax(axis=1), t) == y
    classifier_right = logits.argmax(axis=1) == y
    any_right = (t == y[:, None]).any(axis=1) | classifier_right
    np.testing.assert_array_equal(correct, any_right)
    assert (agent[classifier_right] == E).all()  # the classifier wins ties (documented)


@pytest.mark.parametrize("coverage,size", [(0.5, 4096), (0.2, 4096), (0.37, 101)])
def test_random_coverage_matches_its_target_within_one_sample(coverage, size):
    method = build("random", coverage=coverage)
    model = training.init_model(method, SPEC, 0)
    x = make_batch(size=size, seed=3).x
    scores_of = nnx.jit(method.agent_scores)
    draws = np.asarray(scores_of(model, x))
    agent = method.reference_scores(None, draws, None, None).argmax(axis=1)
    shares = np.bincount(agent, minlength=E + 1) / len(agent)
    assert abs(shares[E] * size - coverage * size) <= 1, shares
    if size > 1000:  # the humans share the rest at random
        np.testing.assert_allclose(shares[:E], (1 - coverage) / E, atol=0.03)
    # a function of the seed and the pixels only: batching does not change the draws
    np.testing.assert_array_equal(np.asarray(scores_of(model, x[:50])), draws[:50])


@pytest.mark.parametrize("name", ["classifier_only", "best_expert", "random"])
def test_reference_rows_decide_independently_of_sample_order(name):
    """Under workload bounds the decisions follow the stated rule, not the solver's
    tie-breaking: permuting the samples permutes the decisions."""
    from benchmark.assignment import capacity_assignment

    method = build(name)
    batch = make_batch(size=300, seed=5)
    model = training.init_model(method, SPEC, 0)
    method.prepare(model, SimpleNamespace(y=np.asarray(batch.y), t=np.asarray(batch.t)))
    order = np.random.default_rng(0).permutation(300)
    lo, hi = np.array([0.3, 0.3, 0.0]), np.array([0.4, 0.4, 0.4])  # humans balanced, classifier capped

    def decide(x):
        scores = method.reference_scores(None, np.asarray(method.agent_scores(model, x)), None, None)
        return capacity_assignment(scores, lo, hi)

    np.testing.assert_array_equal(decide(batch.x)[order], decide(batch.x[order]))


def test_impute_then_defer_imputes_and_trains_annotators_first():
    method = build("impute_then_defer")
    model = training.init_model(method, SPEC, 0)
    batch = make_batch()
    q_t = method.impute(model, batch, make_inputs(method))
    assert q_t.shape == (16, E, K)

    @nnx.jit
    def grads_at(model, progress):
        return nnx.grad(lambda m: method.loss(m, batch, TrainInputs(progress))[0])(model)

    def moves(grads):
        return any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads))

    first, second = grads_at(model, jnp.float32(0.1)), grads_at(model, jnp.float32(0.6))
    assert not moves(first["deferral"]) and moves(first["annotators"])
    assert moves(second["deferral"]) and moves(second["annotators"])


@pytest.mark.parametrize("policy", ["as_incorrect", "mask"])
def test_l2d_em_gating_target_respects_the_workload(policy):
    method = build("l2d_em", missing_policy=policy)
    batch = make_batch(size=256, missing_expert=0, missing_rate=0.0)
    class_logits = 10.0 * jax.nn.one_hot(batch.y, K)  # a confident, correct classifier
    gate_logits = jnp.zeros((256, E + 1))
    inputs = make_inputs(method, classifier_hi=0.2)
    target, violation = method.gating_target(class_logits, gate_logits, batch, inputs)
    shares = np.asarray(target).mean(axis=0)
    assert (shares <= np.asarray(inputs.hi) + 1e-3).all(), shares
    assert float(violation) <= 1e-3
    np.testing.assert_allclose(np.asarray(target).sum(axis=1), 1.0, atol=1e-5)
    if policy == "mask":  # the expert with no label is excluded (expert 1 always answers)
        assert float(jnp.max(target[:, 0])) < 1e-6


NEW_METHOD = '''
import dataclasses

import jax
import jax.numpy as jnp
import optax

from methods import METHODS
from methods.common import MethodBase
from methods.nets import Network


@METHODS.register("{name}")
@dataclasses.dataclass(frozen=True)
class DeferToConfidentExpert(MethodBase):
    """A classifier and one correctness head per expert, from one backbone."""

    num_experts: int = 0
    num_classes: int = 0
    head_weight: float = 1.0

    def init_model(self, spec, rngs):
        return Network(spec.backbone, spec.input_shape[-1], spec.num_classes + spec.num_experts,
                       rngs=rngs)

    def loss(self, model, batch, inputs):
        out = model(batch.x)
        ce = optax.softmax_cross_entropy_with_integer_labels(out[:, : self.num_classes], batch.y)
        right = (batch.t == batch.y[:, None]).astype(jnp.float32)
        bce = optax.sigmoid_binary_cross_entropy(out[:, self.num_classes :], right)
        heads = jnp.where(batch.t >= 0, bce, 0.0).sum(axis=1)
        return (ce + self.head_weight * heads).mean(), {{}}

    def classify(self, model, x):
        return model(x)[:, : self.num_classes]

    def agent_scores(self, model, x):
        out = model(x)
        confidence = jax.nn.softmax(out[:, : self.num_classes]).max(axis=1, keepdims=True)
        return jnp.concatenate([jax.nn.sigmoid(out[:, self.num_classes :]), confidence], axis=1)
'''


def test_a_new_method_is_one_short_file_that_spells_its_name_once(tmp_path, monkeypatch):
    """About 40 lines register a trainable method: the registry sets its name, Hydra's
    config is generated from its fields, and the trainer and evaluator take it as it is."""
    import importlib

    source = NEW_METHOD.format(name="confident_expert")
    assert len(source.strip().splitlines()) <= 45 and source.count("confident_expert") == 1
    (tmp_path / "confident_expert_method.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(methods.METHODS, "_entries", dict(methods.METHODS._entries))  # undone after
    module = importlib.import_module("confident_expert_method")
    cls = methods.METHODS.get("confident_expert")
    assert cls is module.DeferToConfidentExpert and cls.name == "confident_expert"
    assert config_lib.method_options(cls) == {"head_weight": 1.0}
    method = config_lib.build_method("confident_expert", {"head_weight": 0.5}, SPEC)
    history, logits, scores, _ = run(method)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert logits.shape == (16, K) and scores.shape == (16, E + 1)
    assert 0.0 <= scores.min() and scores.max() <= 1.0


@pytest.mark.parametrize("name", NAMES)
def test_every_method_file_spells_its_name_once(name):
    """The registered name is written in the decorator only (the registry sets ``name``)."""
    import ast
    import inspect

    cls = CLASSES[name]
    assert cls.name == name
    tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    spelled = [node for node in ast.walk(tree) if isinstance(node, ast.Constant)
               and node.value == name and id(node) not in docstrings]
    assert len(spelled) == 1


def test_method_template_satisfies_the_contract():
    """The documented template (not registered) trains and predicts like any method."""
    from core.spec import Method
    from methods.template import MyMethod

    method = MyMethod(num_experts=E, num_classes=K)
    assert isinstance(method, Method) and "my_method" not in NAMES
    history, logits, scores, _ = run(method)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert logits.shape == (16, K) and scores.shape == (16, E + 1)


def test_reading_bounds_without_declaring_them_fails_loudly():
    """A method that uses the workload in training must say so (else its predictions would
    be reused across workloads): reading ``inputs.bounds`` undeclared raises."""
    from core.spec import UndeclaredBoundsError
    from methods.template import MyMethod

    @dataclasses.dataclass(frozen=True)
    class Sneaky(MyMethod):
        def loss(self, model, batch, inputs):
            loss, metrics = super().loss(model, batch, inputs)
            return loss + inputs.bounds[1][-1], metrics

    method = Sneaky(num_experts=E, num_classes=K)
    with pytest.raises(UndeclaredBoundsError, match="workload_in_training = True"):
        run(method, steps=1)
    assert make_inputs(build("prob_l2d")).hi is not None  # declared: bounds are passed


@pytest.mark.parametrize("name", NAMES)
def test_hydra_config_builds_the_dataclass_defaults(name):
    """The Hydra config ``method=<name>`` is generated from the dataclass: same object."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from tests.conftest import REPO_ROOT

    config_lib.register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=single", f"method={name}"])
        # what `method=glob(*)` sweeps: every registered method and the named variants of
        # conf/method/ (each a registered method with other options), nothing else
        options = GlobalHydra.instance().config_loader().get_group_options("method")
    variants = sorted(path.stem for path in (REPO_ROOT / "conf" / "method").glob("*.yaml"))
    assert sorted(options) == sorted(NAMES + variants)
    method_cfg = OmegaConf.to_container(cfg.method)
    assert method_cfg["name"] == name and method_cfg["label"] is None
    from_hydra = config_lib.build_method(method_cfg["name"], method_cfg["params"], SPEC)
    fields = {f.name for f in dataclasses.fields(CLASSES[name])}
    task = {k: v for k, v in {"num_experts": E, "num_classes": K}.items() if k in fields}
    # the dataclass defaults, with the validation-tuned values of the default dataset, if any
    tuned = REPO_ROOT / "conf" / "tuned" / f"digits_{name}.yaml"
    tuned_params = (OmegaConf.to_container(OmegaConf.load(tuned)).get("method") or {}).get(
        "params", {}) if tuned.is_file() else {}
    assert from_hydra == CLASSES[name](**task, **tuned_params)


def test_reference_rows_share_one_trained_classifier():
    """classifier_only, oracle and random name the same training problem: the same
    parameters after the same initialisation, so one training serves all three."""
    shared = {name for name in NAMES if CLASSES[name].training_problem == "cross_entropy_classifier"}
    assert shared == {"classifier_only", "oracle", "random"}
    states = []
    for name in sorted(shared):
        model = training.init_model(build(name), SPEC, 3)
        states.append(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for other in states[1:]:
        for a, b in zip(states[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- the three newest baselines


def test_two_stage_surrogate_on_a_hand_worked_batch():
    """y = 0; expert 0 right, expert 1 wrong, the classifier (argmax 2) wrong: costs
    (0, 1, 1), weights tau_k = sum of the others' costs = (2, 1, 1); a uniform rejector pays
    log 3 per unit of weight. Under "mask" a missing expert 1 leaves the softmax: weights
    (1, -, 0) over two agents, log 2."""
    from methods.two_stage import two_stage_surrogate

    y = jnp.array([0])
    classifier = jnp.array([[0.0, 0.0, 5.0]])
    rejector = jnp.zeros((1, 3))
    both = jnp.array([[0, 1]])
    one_missing = jnp.array([[0, MISSING]])
    assert float(two_stage_surrogate(rejector, classifier, y, both, "mask")) == pytest.approx(4 * np.log(3))
    assert float(two_stage_surrogate(rejector, classifier, y, one_missing, "mask")) == pytest.approx(np.log(2))
    assert float(two_stage_surrogate(rejector, classifier, y, one_missing, "as_incorrect")) == pytest.approx(4 * np.log(3))
    assert float(two_stage_surrogate(rejector, classifier, y, one_missing, "drop")) == 0.0
    # the classifier's cost comes from its predictions, never its gradient
    grad = jax.grad(lambda c: two_stage_surrogate(rejector, c, y, both, "mask"))(classifier)
    assert float(jnp.abs(grad).max()) == 0.0


def test_team_loss_on_a_hand_worked_batch():
    """Uniform weights over (expert 0, expert 1, classifier), y = 0, expert 0 right, expert 1
    wrong, a uniform classifier over 3 classes: P(y) = 1/3 + 0 + 1/9 = 4/9. Under "mask" a
    missing expert 1 leaves the team: P(y) = 1/2 + 1/6 = 2/3."""
    from methods.team_allocation import team_loss

    y = jnp.array([0])
    allocation, classifier = jnp.zeros((1, 3)), jnp.zeros((1, 3))
    assert float(team_loss(allocation, classifier, y, jnp.array([[0, 1]]), "mask")) == pytest.approx(-np.log(4 / 9))
    one_missing = jnp.array([[0, MISSING]])
    assert float(team_loss(allocation, classifier, y, one_missing, "mask")) == pytest.approx(-np.log(2 / 3))
    assert float(team_loss(allocation, classifier, y, one_missing, "as_incorrect")) == pytest.approx(-np.log(4 / 9))
    assert float(team_loss(allocation, classifier, y, one_missing, "drop")) == 0.0


def minimise(loss_of_logits, logits, steps=300, rate=0.5):
    grad = jax.jit(jax.grad(loss_of_logits))
    for _ in range(steps):
        logits = logits - rate * grad(logits)
    return logits


@pytest.mark.parametrize("method", ["two_stage", "team_allocation"])
def test_the_learned_allocation_picks_the_agent_that_is_right(method):
    """Free allocation logits per sample, minimised on a batch where a different agent is
    the only correct one on each of three kinds of sample: the argmax is that agent."""
    from methods.team_allocation import team_loss
    from methods.two_stage import two_stage_surrogate

    y = jnp.array([0, 1, 2])
    t = jnp.array([[0, 2], [2, 1], [1, 0]])  # sample 0: expert 0 right; 1: expert 1; 2: neither
    classifier = jnp.array([[0.0, 4.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 4.0]])  # right on 2 only
    if method == "two_stage":
        loss = lambda r: two_stage_surrogate(r, classifier, y, t, "mask")  # noqa: E731
    else:
        loss = lambda r: team_loss(r, classifier, y, t, "mask")  # noqa: E731
    learned = minimise(loss, jnp.zeros((3, 3)))
    assert list(np.asarray(jnp.argmax(learned, axis=1))) == [0, 1, 2]


def test_post_hoc_defers_by_the_bayes_rule_on_the_base_model():
    """The classifier scores its confidence, each expert its estimated correctness; the
    estimators see the base model's probabilities and never send it a gradient."""
    method = build("post_hoc")
    model = training.init_model(method, SPEC, 0)
    batch = make_batch(size=8)
    loss = nnx.jit(method.loss)  # jitted as the trainer runs it (eagerly every op compiles)
    early, _ = loss(model, batch, TrainInputs(jnp.float32(0.2)))
    late, metrics = loss(model, batch, TrainInputs(jnp.float32(0.8)))
    assert float(late) == pytest.approx(float(early) + float(metrics["correctness_bce"]), rel=1e-5)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def estimator_loss(params):
        merged = nnx.merge(graphdef, params, rest)
        return method.loss(merged, batch, TrainInputs(jnp.float32(0.8)))[1]["correctness_bce"]

    grads = jax.jit(jax.grad(estimator_loss))(params)
    classifier_grads = jax.tree.leaves(grads["classifier"]) if "classifier" in grads else []
    assert classifier_grads and all(float(jnp.abs(g).max()) == 0.0 for g in classifier_grads)
    scores = np.asarray(nnx.jit(method.agent_scores)(model, batch.x))
    class_probs = np.asarray(jax.nn.softmax(nnx.jit(method.classify)(model, batch.x), axis=-1))
    np.testing.assert_allclose(scores[:, -1], class_probs.max(axis=1), rtol=1e-5)
