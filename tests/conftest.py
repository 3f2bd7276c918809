"""Shared fixtures: a tiny on-disk dataset in the digits preset's layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.config import register_configs

register_configs()  # the typed schema (cell_schema) and method=<name>, as the entry point does

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
NUM_EXPERTS = 3


def write_tiny_dataset(root: Path, num_train: int = 48, num_test: int = 24, seed: int = 0,
                       incomplete: bool = False) -> Path:
    """8x8 grayscale PNGs whose brightness pattern encodes the class, plus manifests named
    as in conf/dataset/digits.yaml. Expert j is right on classes with c % 3 == j, else
    answers (c + 1) % 10. Complete annotations (a drawn missing rate applies to them), or
    with ``incomplete`` expert 2's training annotations missing on every 3rd image."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("test", num_test)):
        files, labels = [], []
        for i in range(count):
            label = i % NUM_CLASSES
            image = rng.integers(0, 60, size=(8, 8)).astype(np.uint8)
            image[label % 8, :] = 255
            file = f"{split}/{label}/{i:03d}.png"
            (root / file).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / file)
            files.append(file)
            labels.append(label)
        (root / f"{split}_ground_truth.json").write_text(
            json.dumps([{"file": f, "label": y} for f, y in zip(files, labels)])
        )
        for j in range(NUM_EXPERTS):
            records = []
            for i, (f, y) in enumerate(zip(files, labels)):
                if incomplete and split == "train" and j == 2 and i % 3 == 0:
                    continue
                records.append({"file": f, "label": y if y % 3 == j else (y + 1) % NUM_CLASSES})
            (root / f"{split}_expert_{j}.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One JAX compilation cache for the session's runs (``jax_cache_dir`` reads this
    variable): CLI runs in subprocesses compile the same programs once."""
    previous = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    yield
    if previous is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = previous


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "tiny")


@pytest.fixture
def incomplete_root(tmp_path: Path) -> Path:
    """The tiny dataset with expert 2's training annotations missing on every 3rd image."""
    return write_tiny_dataset(tmp_path / "tiny", incomplete=True)


def tiny_overrides(root: Path, output_dir: Path) -> list[str]:
    """Hydra overrides pointing the digits preset at a tiny dataset, fast and untracked."""
    return [
        f"dataset.root={root}",
        "dataset.builder=null",
        "tracking=none",
        "train.epochs=2",
        "train.batch_size=16",
        f"output_dir={output_dir}",
    ]


FAST_COMPILE_FLAG = "--xla_backend_optimization_level=1"


def pytest_configure(config):
    """Compile at LLVM optimisation level 1 instead of 3 (``XLA_FLAGS``, read when the
    backend starts, so before any test runs; the app runs the tests start inherit it). Most
    of the suite's time is XLA compiling small programs that then run for milliseconds:
    level 1 compiles them about a third faster and computes the same values (no fast-math
    either way). Never while benchmarks are timed (``--benchmark-enable``); off with
    ``L2D_TEST_XLA_OPT=default``."""
    timed = config.getoption("benchmark_enable", False) or not config.getoption("benchmark_disable", True)
    if timed or os.environ.get("L2D_TEST_XLA_OPT") == "default":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ``--slow`` or ``L2D_SLOW=1``."""
    if config.getoption("--slow") or os.environ.get("L2D_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with ./run.sh test --slow (or L2D_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


DIGITS_SMOKE_METHODS = ("two_stage", "team_allocation", "post_hoc", "l2d_pop", "conformal_l2d",
                        "two_stage_cost", "random")


@pytest.fixture(scope="session")
def digits_coverage_smoke(tmp_path_factory) -> Path:
    """``experiment=coverage_smoke`` on the embedded digits dataset (its 8 epochs and the
    tuned presets, one seed) at coverage targets 0 and 0.5, for the newest methods and random
    deferral: one run shared by the tests that compare them with random deferral
    (test_coverage, test_population). Returns the output folder."""
    from tests.test_pipeline import run_cli

    out = tmp_path_factory.mktemp("digits_coverage_smoke")
    result = run_cli("experiment=coverage_smoke", "tracking=none", f"output_dir={out}",
                     "method=" + ",".join(DIGITS_SMOKE_METHODS), "workload.coverage=0,0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    return out
