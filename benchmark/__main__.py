"""Entry point: ``python -m benchmark [hydra overrides]`` (what ``./run.sh`` calls)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    """Run one grid cell; in a single run, print its metrics or a clean error."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from benchmark.console import print_cell
    from benchmark.runner import run_cell

    record = run_cell(OmegaConf.to_container(cfg, resolve=True))
    if HydraConfig.get().mode == RunMode.RUN:
        print_cell(record)
        if record["status"] == "failed":
            sys.exit(1)
    return {"status": record["status"], "error": record.get("error"), "cell": record["cell"]}


if __name__ == "__main__":
    main()
