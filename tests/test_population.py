"""Learning to defer to a population (``l2d_pop``): context sets, their read-outs, the
context memory, decisions that follow a context, the held-out-expert setting and its
experiment; and the digits smoke of the three methods of issue 29 against random deferral."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmark import training
from benchmark.config import ConfigError, build_method, to_cell
from benchmark.data import CellData, hold_out_experts
from core.spec import MISSING, TaskSpec
from datasets.source import ArraySplit
from methods.population import attend, batch_context, context_accuracy
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_pipeline import compose_cfg

K = 4
SPEC = TaskSpec(num_classes=K, num_experts=2, input_shape=(8, 8, 1))


# ----------------------------------------------------------------------------- context sets


def test_batch_context_against_brute_force():
    """Sample i's context for expert j: the first ``size`` other samples j annotated."""
    rng = np.random.default_rng(0)
    observed = rng.random((12, 3)) < 0.6
    for size in (1, 3, 20):
        mask = np.asarray(batch_context(jnp.asarray(observed), size))
        for i, j in itertools.product(range(12), range(3)):
            others = [k for k in range(12) if k != i and observed[k, j]][:size]
            assert np.flatnonzero(mask[i, j]).tolist() == others, (size, i, j)


def test_attention_and_mean_read_outs_by_hand():
    """One query, one expert, three context codes (1, 0), (0, 1), (5, 5), the third masked
    out; attention logits log 3 and 0: weights 3/4 and 1/4. An empty context reads zeros."""
    values = jnp.array([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    logits = jnp.array([[[np.log(3.0), 0.0, 9.0]]])
    mask = jnp.array([[[True, True, False]]])
    attended, mean = attend(logits, mask, values)
    np.testing.assert_allclose(attended[0, 0], [0.75, 0.25], rtol=1e-6)
    np.testing.assert_allclose(mean[0, 0], [0.5, 0.5], rtol=1e-6)
    empty_attended, empty_mean = attend(logits, jnp.zeros_like(mask), values)
    assert float(jnp.abs(empty_attended).max()) == 0.0 and float(jnp.abs(empty_mean).max()) == 0.0


def test_context_accuracy_by_hand():
    """Expert 0's context: class 0 right twice, class 1 wrong once, class 2 right once.
    Overall (3 + 1) / (4 + 2) = 2/3. Per class (right + 2/3) / (seen + 1): class 0 (8/3)/3 =
    8/9, class 1 (2/3)/2 = 1/3, class 3 (never seen) 2/3. A query sure of class 0 reads 8/9;
    one split 1/2-1/2 between classes 1 and 3 reads 1/2. With the third pair masked out the
    overall accuracy is (2 + 1) / (3 + 2) = 3/5, class 0 reads (2 + 3/5) / 3."""
    y = jnp.array([[0, 0, 1, 2]])
    t = jnp.array([[0, 0, 3, 2]])
    probs = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.5]])
    mask = jnp.ones((2, 1, 4), bool)
    np.testing.assert_allclose(context_accuracy(probs, t, y, mask)[:, 0], [8 / 9, 0.5], rtol=1e-6)
    mask = mask.at[:, :, 3].set(False)
    np.testing.assert_allclose(context_accuracy(probs[:1], t, y, mask[:1])[0, 0], (2 + 0.6) / 3, rtol=1e-6)


def test_memory_keeps_each_experts_latest_annotations():
    """A memory of 3 slots: expert 0 annotates 4 samples of the first batch (the first 3
    are kept), expert 1 one; in the second batch expert 0 annotates one more (it replaces
    the oldest slot) and expert 1 one (its memory fills up to 2)."""
    method = build_method("l2d_pop", {"context_size": 3}, SPEC)
    model = training.init_model(method, SPEC, 0)
    x = jnp.arange(5, dtype=jnp.float32)[:, None, None, None] * jnp.ones((5, 8, 8, 1))
    y = jnp.array([0, 1, 2, 3, 0])
    t = jnp.array([[0, MISSING], [1, MISSING], [3, MISSING], [3, 2], [MISSING, MISSING]])
    model.remember(x, y, t)
    assert model.memory_filled[...].tolist() == [3, 1] and model.memory_next[...].tolist() == [0, 1]
    assert model.memory_t[...][0].tolist() == [0, 1, 3] and model.memory_y[...][0].tolist() == [0, 1, 2]
    assert float(model.memory_x[...][1, 0, 0, 0, 0]) == 3.0  # expert 1's answer was on sample 3
    t = jnp.array([[MISSING, MISSING], [MISSING, 0], [MISSING, MISSING], [MISSING, MISSING], [2, MISSING]])
    model.remember(x, y, t)
    assert model.memory_filled[...].tolist() == [3, 2] and model.memory_next[...].tolist() == [1, 2]
    assert model.memory_t[...][0].tolist() == [2, 1, 3]  # slot 0 (the oldest) now holds sample 4
    assert float(model.memory_x[...][0, 0, 0, 0, 0]) == 4.0
    assert model.memory_t[...][1, :2].tolist() == [2, 0]


# ----------------------------------------------------------------------------- decisions


def constructed_model(surrogate="ova"):
    """An l2d_pop model whose learned correctness part is switched off (the head outputs 0),
    whose classifier is sure of class 0 for every input, and whose memory holds 4 answers per
    expert: expert 0 right on class 0 and wrong on class 1, expert 1 the other way round."""
    method = build_method("l2d_pop", {"context_size": 4, "surrogate": surrogate}, SPEC)
    model = training.init_model(method, SPEC, 0)
    model.head_out.kernel[...] = jnp.zeros_like(model.head_out.kernel[...])
    model.head_out.bias[...] = jnp.zeros_like(model.head_out.bias[...])
    model.classifier.kernel[...] = jnp.zeros_like(model.classifier.kernel[...])
    model.classifier.bias[...] = jnp.array([20.0, 0.0, 0.0, 0.0])
    model.memory_y[...] = jnp.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    model.memory_t[...] = jnp.array([[0, 0, 2, 2], [3, 3, 1, 1]])
    model.memory_filled[...] = jnp.array([4, 4])
    return method, model


def test_scores_follow_the_context_set_so_a_new_expert_needs_no_training():
    """On class 0 expert 0's context shows 2 of 2 right (accuracy (2 + 1/2) / 3 = 5/6) and
    expert 1's 0 of 2 (1/6): expert 0 is chosen. Give the same model other context sets
    (the experts' answers swapped, as for two new experts) and the choice swaps."""
    method, model = constructed_model()
    scores_of = nnx.jit(method.agent_scores)  # as predictions run it; reads the memory each call
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
    scores = np.asarray(scores_of(model, x))
    np.testing.assert_allclose(scores[:, :2], [[5 / 6, 1 / 6]] * 3, atol=1e-4)
    assert (scores[:, :2].argmax(axis=1) == 0).all()
    model.memory_t[...] = model.memory_t[...][::-1]
    scores = np.asarray(scores_of(model, x))
    np.testing.assert_allclose(scores[:, :2], [[1 / 6, 5 / 6]] * 3, atol=1e-4)
    # and an expert with no context reads its accuracy as unknown: (0 + 1) / (0 + 2) = 1/2
    model.memory_filled[...] = jnp.array([0, 4])
    np.testing.assert_allclose(np.asarray(scores_of(model, x))[:, 0], 0.5, atol=1e-4)


def test_softmax_scores_rank_the_experts_the_same_way():
    method, model = constructed_model("softmax")
    x = jnp.zeros((2, 8, 8, 1))
    assert (np.asarray(nnx.jit(method.agent_scores)(model, x))[:, :2].argmax(axis=1) == 0).all()


@pytest.mark.parametrize("params,message", [
    ({"missing_policy": "impute"}, "does not support missing_policy='impute'"),
    ({"surrogate": "hinge"}, "surrogate must be one of ova, softmax"),
    ({"context_size": 0}, "context_size must be >= 1"),
])
def test_bad_options_are_refused_naming_them(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("l2d_pop", params, SPEC)


# ----------------------------------------------------------------------------- held-out experts


def split_data(t):
    n = len(t)
    split = ArraySplit(np.zeros((n, 8, 8, 1), np.uint8), np.zeros(n, int), np.asarray(t))
    return CellData(files=None, train=split, test=split, train_complete_t=None, manifests={})


def test_a_held_out_expert_keeps_only_its_context_answers():
    rng = np.random.default_rng(0)
    t = np.where(rng.random((200, 3)) < 0.2, MISSING, rng.integers(0, 10, (200, 3)))
    held = hold_out_experts(split_data(t), [2], context=7, seed=3)
    kept = held.train.t[:, 2] != MISSING
    assert kept.sum() == 7
    np.testing.assert_array_equal(held.train.t[kept, 2], t[kept, 2])  # answers kept as given
    assert (t[kept, 2] != MISSING).all()  # drawn among the answers it gave
    np.testing.assert_array_equal(held.train.t[:, :2], t[:, :2])  # the other experts untouched
    np.testing.assert_array_equal(held.test.t, t)  # test answers untouched
    again = hold_out_experts(split_data(t), [2], context=7, seed=3)
    np.testing.assert_array_equal(again.train.t, held.train.t)  # seeded
    assert hold_out_experts(split_data(t), [], context=7, seed=3).train.t is not None
    few = hold_out_experts(split_data(t[:5]), [2], context=7, seed=3)  # fewer answers than 7
    np.testing.assert_array_equal(few.train.t, t[:5])


@pytest.mark.parametrize("value,message", [
    ("[3]", r"distinct expert indices in \[0, 3\)"),
    ("[0,0]", "distinct expert indices"),
    ("[0,1,2]", "leaving at least one expert to train on"),
])
def test_bad_held_out_experts_are_refused_naming_the_option(tiny_root, tmp_path, value, message):
    with pytest.raises(ConfigError, match=r"dataset\.held_out_experts must be .*" + message):
        compose_cfg(tiny_overrides(tiny_root, tmp_path) + [f"dataset.held_out_experts={value}"])


def test_held_out_expert_experiment_is_its_own_report_group(tiny_root, tmp_path):
    """The experiment on the tiny dataset, beside an ordinary run in the same results folder:
    expert 2 trains with 4 answers, the record's dataset is digits_held_out, and the report
    ranks the two datasets in separate groups."""
    from benchmark.config import RunConfig
    from benchmark.data import load_data
    from benchmark.runner import run_cell
    from core.records import load_records
    from reports import write_report

    common = tiny_overrides(tiny_root, tmp_path) + [
        "method=l2d_pop", "missing_rate=0", "seed=0", "workload=none", "experiment_name=both",
        "train.epochs=1"]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "experiment=held_out_expert", *common, "dataset.held_out_context=4"],
                      return_hydra_config=True)
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    cell = to_cell(cfg)
    assert cell.dataset.name == "digits_held_out" and cell.dataset.held_out_experts == [2]
    run = RunConfig.build(cell, REPO_ROOT)
    data = load_data(run.dataset, 0.0, run.data_cache_dir, (run.validation_fraction, run.validation_seed))
    assert (data.train.t[:, 2] != MISSING).sum() == 4 and (data.train.t[:, :2] != MISSING).all()
    assert (data.test.t != MISSING).all()
    held = run_cell(cell, choices)
    assert held["status"] == "ok", held.get("error")
    # the label: the experiment's dataset name (with @<hash> here, as the tiny dataset's root
    # differs from the preset's)
    assert held["cell"]["dataset"].split("@")[0] == "digits_held_out"
    plain_cfg, plain_choices = compose_cfg(common)
    plain = run_cell(plain_cfg, plain_choices)
    assert plain["status"] == "ok" and plain["cell"]["dataset"].split("@")[0] == "digits"
    paths = write_report(load_records(tmp_path / "runs/both"), tmp_path / "report")
    board = pd.read_csv(paths["leaderboard.csv"])
    assert sorted(board["dataset"]) == sorted([plain["cell"]["dataset"], held["cell"]["dataset"]])
    assert (board["rank"] == 1).all()  # each the only learned method of its own group
    assert "[digits_held_out" in paths["leaderboard.txt"].read_text()


# ----------------------------------------------------------------------------- digits smoke


def test_the_three_new_methods_beat_random_deferral_at_equal_coverage_on_digits(digits_coverage_smoke):
    """A digits smoke (the embedded dataset, coverage_smoke's 8 epochs and the tuned presets,
    one seed, two coverage targets below 1; the run conftest's ``digits_coverage_smoke``
    shares with test_coverage): l2d_pop, conformal_l2d and two_stage_cost are each more
    accurate than random deferral at the same coverage, and the conformal method records
    its mean set size."""
    from core.records import load_records

    targets = pd.read_csv(digits_coverage_smoke / "runs/coverage_smoke/report/coverage_targets.csv")
    accuracy = targets.pivot_table(index="target", columns="method", values="accuracy")
    for method in ("l2d_pop", "conformal_l2d", "two_stage_cost"):
        assert (accuracy[method] > accuracy["random"]).all(), accuracy
    records = load_records(digits_coverage_smoke / "runs/coverage_smoke")
    sizes = [r["run_metrics"]["expert_set_size"] for r in records if r["method_name"] == "conformal_l2d"]
    assert len(sizes) == 2 and all(1.0 <= size <= 3.0 for size in sizes)
