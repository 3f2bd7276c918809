"""Entry point: ``python -m benchmark [hydra overrides]`` (what ``./run.sh`` calls)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from benchmark.config import register_method_configs

register_method_configs()  # method=<name> for every registered method, from its dataclass

@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    """Run one grid cell; in a single run, print its metrics or a clean error."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from benchmark.console import print_cell
    from benchmark.runner import run_cell

    hydra_cfg = HydraConfig.get()
    choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
    record = run_cell(OmegaConf.to_container(cfg, resolve=True), choices)
    if hydra_cfg.mode == RunMode.RUN:
        print_cell(record)
        if record["status"] == "failed":
            sys.exit(1)
    return {"status": record["status"], "error": record.get("error"), "cell": record["cell"]}


if __name__ == "__main__":
    main()
