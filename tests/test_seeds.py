"""Seeds in one program: several seeds of a cell train as one vmapped program and give the
results of training each seed on its own."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark import training
from benchmark.config import build_method
from benchmark.predictions import seed_block
from core.records import load_records
from core.spec import WorkloadBounds
from tests.conftest import tiny_overrides
from tests.test_methods import OPTIM, SPEC, make_batch
from tests.test_pipeline import run_cli


def test_seed_blocks_are_consecutive_seeds():
    assert seed_block(4, 3) == [3, 4, 5]
    assert seed_block(0, 3) == [0, 1, 2]
    assert seed_block(7, 1) == [7]


@pytest.mark.parametrize("name", ["classifier_only", "prob_l2d"])
def test_one_program_equals_separate_trainings(name):
    method = build_method(name, {}, SPEC)
    seeds = (0, 1, 2)
    # each seed its own batches (order, labels and missing pattern differ)
    batches = {s: [make_batch(seed=10 * s + k) for k in range(3)] for s in seeds}

    def train(group):
        models = [training.init_model(method, SPEC, s) for s in group]
        return training.fit(method, models, [lambda epoch, s=s: iter(batches[s]) for s in group],
                            epochs=2, optim=OPTIM,
                            bounds=WorkloadBounds((0.0,) * 3, (1.0, 1.0, 0.5)))

    together = train(seeds)
    alone = [train((s,))[0] for s in seeds]
    x = make_batch(seed=99).x
    outputs = [t.predict(np.asarray(x))["scores"] for t in together]
    for seed, (joint, single) in enumerate(zip(together, alone)):
        assert joint.seeds_in_program == 3 and single.seeds_in_program == 1
        np.testing.assert_allclose(outputs[seed], single.predict(np.asarray(x))["scores"],
                                   rtol=1e-4, atol=1e-5)
        assert [h["loss"] for h in joint.history] == pytest.approx(
            [h["loss"] for h in single.history], rel=1e-4)
    assert not np.allclose(outputs[0], outputs[1])  # seeds stay distinct


def cached_logits(cache_dir):
    out = {}
    for path in cache_dir.glob("*.npz"):
        if path.name.startswith("trained-"):
            continue
        with np.load(path) as saved:
            out[path.name] = saved["test/logits"]
    return out


def test_grid_with_seeds_in_one_program_matches_separate_seeds(tiny_root, tmp_path):
    grid = ["experiment=smoke", "method=classifier_only,prob_l2d", "workload=paper",
            "missing_rate=0.5", "seed=0,1"]  # three seeds in one program: test_one_program_equals_separate_trainings
    runs = {}
    # the same data cache, separate results and predictions; the joint program also runs
    # data-parallel over two CPU devices (each seed's batch split between them)
    for per_program, devices in ((1, 1), (2, 2)):
        results, cache = tmp_path / f"runs{per_program}", tmp_path / f"cache{per_program}"
        result = run_cli(*tiny_overrides(tiny_root, tmp_path), *grid, f"seeds_per_program={per_program}",
                         f"results_dir={results}", f"cache_dir={cache}",
                         env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
        assert result.returncode == 0, result.stderr[-2000:]
        records = {(r["method_name"], r["cell"]["seed"]): r for r in load_records(results)}
        assert len(records) == 4 and all(r["status"] == "ok" for r in records.values())
        assert {r["run_metrics"]["seeds_in_program"] for r in records.values()} == {per_program}
        assert {r["run_metrics"]["num_devices"] for r in records.values()} == {devices}
        runs[per_program] = records, cached_logits(cache)
    (separate, separate_logits), (joint, joint_logits) = runs[1], runs[2]
    assert separate_logits.keys() == joint_logits.keys()  # the same cache entries per seed
    for name, logits in separate_logits.items():
        np.testing.assert_allclose(joint_logits[name], logits, rtol=1e-3, atol=1e-3)
    for key, record in separate.items():
        # each seed keeps its own missing-annotation draw and its own record path
        assert joint[key]["missing_annotations"] == record["missing_annotations"]
        assert joint[key]["cell"] == record["cell"] and joint[key]["variant"] == record["variant"]
