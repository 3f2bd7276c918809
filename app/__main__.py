"""Entry point: ``python -m app [hydra overrides]`` (what ``./run.sh`` calls)."""

from __future__ import annotations

import sys

if __name__ == "__main__":  # Ctrl-C takes one path from here on, imports included
    from app import interrupt

    interrupt.install()

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from app.callbacks import OUTCOMES, outcome_of
from app.console import print_cell
from app.launchers import register_ray_launcher_config
from app.tuning import objective_value
from benchmark.config import ConfigError, register_configs, to_cell
from benchmark.runner import run_cell
from core.spec import NOT_APPLICABLE

register_configs()  # the typed schema and method=<name> for every registered method
register_ray_launcher_config()  # hydra/launcher=ray: local on 127.0.0.1, or RAY_ADDRESS


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    """Run one grid cell; in a single run, print its metrics or a clean error."""
    hydra_cfg = HydraConfig.get()
    choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
    try:
        record = run_cell(to_cell(cfg), choices)
    except ConfigError as err:  # a value out of range: no identity, named by its overrides
        record = {"status": "failed", "error": f"ConfigError: {err}",
                  "cell": {"job": " ".join(hydra_cfg.overrides.task) or "(no overrides)"}}
    if hydra_cfg.mode == RunMode.RUN:
        print_cell(record)
        if record["status"] in ("failed", NOT_APPLICABLE):
            sys.exit(1)
    outcome = outcome_of(record)
    if cfg.get("objective"):  # experiment=tune: the sweeper wants a number
        OUTCOMES.append(outcome)
        return objective_value(record, cfg.objective)
    return outcome


if __name__ == "__main__":
    main()
