"""``experiment=tune``: per-method hyper-parameter search on validation accuracy with the
Hydra Optuna sweeper, written as a tuned preset that later runs use.

* ``method_search_space`` is the sweeper's ``custom_search_space``: it adds every option a
  method declares with ``core.spec.tunable`` to the trial (the experiment adds the
  shared ``train.*`` ranges).
* ``write_tuned_preset`` turns the sweeper's ``optimization_results.yaml`` into
  ``conf/tuned/<dataset>_<method>.yaml``, which Hydra's defaults list
  (``optional tuned: ${dataset}_${method}``) applies to every later run of that pair.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, cast

from omegaconf import DictConfig, OmegaConf

from core.files import atomic_write_text
from core.spec import SEARCH
from methods import METHODS, get_method_class

METHOD_PREFIX = "method.params."


def search_space(cls: type) -> dict[str, tuple[float, float, bool]]:
    """``{"method.params.<option>": (low, high, log)}`` of a method class's tunable options."""
    return {f"{METHOD_PREFIX}{f.name}": f.metadata[SEARCH]
            for f in dataclasses.fields(cls) if SEARCH in f.metadata}


def method_search_space(cfg: DictConfig, trial: Any) -> None:
    """The Optuna sweeper's ``custom_search_space``: suggest the method's tunable options."""

    for name, (low, high, log) in search_space(get_method_class(str(cfg.method.name))).items():
        if isinstance(low, int) and isinstance(high, int):
            trial.suggest_int(name, low, high, log=log)
        else:
            trial.suggest_float(name, float(low), float(high), log=log)


def _rounded(value: Any) -> Any:
    return float(f"{value:.3g}") if isinstance(value, float) else value


def preset_from_best(best_params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested config of the chosen values: ``{"method": {"params": ...}, "train": ...}``."""
    preset: dict[str, Any] = {}
    for key, value in sorted(best_params.items()):
        node = preset
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _rounded(value)
    return preset


def write_tuned_preset(config: DictConfig, tuned_dir: Path) -> Path | None:
    """Write the best trial of a finished ``experiment=tune`` sweep as the tuned preset of its
    (dataset, method), and of every method sharing its training problem (they train the
    same model: one choice serves them all); returns the tuned method's path (None if the
    sweeper left no results)."""


    results = Path(config.hydra.sweep.dir) / "optimization_results.yaml"
    if not results.is_file():
        return None
    best = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(results)))
    dataset, method = config.hydra.runtime.choices.dataset, str(config.method.name)
    header = (
        "# @package _global_\n"
        f"# Tuned preset of {method} on {dataset}, applied to every run of that pair (delete the\n"
        f"# file to use the method's dataclass defaults). Chosen by `./run.sh experiment=tune\n"
        f"# dataset={dataset} method={method}` on {config.objective} of the validation split\n"
        f"# (never the test split): {config.hydra.sweeper.n_trials} trials, best "
        f"{best['best_value']:.4f}, missing rate {config.missing_rate:g}, workload "
        f"{config.workload.name}, seed {config.seed}, {time.strftime('%Y-%m-%d')}.\n"
    )
    body = OmegaConf.to_yaml(OmegaConf.create(preset_from_best(best["best_params"])))
    problem = get_method_class(method).training_problem
    sharing = [name for name in METHODS.names() if name != method and problem is not None
               and METHODS.get(name).training_problem == problem]
    for name in sharing:
        shared = f"# @package _global_\n# Shared with {method}: the same training problem ({problem}).\n"
        atomic_write_text(tuned_dir / f"{dataset}_{name}.yaml",
                          header.replace("# @package _global_\n", shared) + body)
    path = tuned_dir / f"{dataset}_{method}.yaml"
    atomic_write_text(path, header + body)
    return path


def objective_value(record: Mapping[str, Any], objective: str) -> float:
    """The record's value at ``objective`` (``validation/constrained/accuracy``); NaN if absent."""
    node: Any = record
    for part in objective.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return float("nan")
        node = node[part]
    return float(node) if node is not None else float("nan")
