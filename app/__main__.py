"""Entry point: ``python -m app [hydra overrides]`` (what ``./run.sh`` calls)."""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, cast

if __name__ == "__main__":  # Ctrl-C takes one path from here on, imports included
    from app import interrupt

    interrupt.install()

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from app.console import print_cell
from app.interrupt import PROGRESS
from app.launchers import register_ray_launcher_config
from app.preflight import stop_writing
from app.tuning import objective_value
from benchmark.config import ConfigError, register_configs, to_cell
from benchmark.runner import run_cell
from core.records import write_outcome
from core.spec import Outcome, Status

register_configs()  # the typed schema and method=<name> for every registered method
register_ray_launcher_config()  # hydra/launcher=ray: local on 127.0.0.1, or RAY_ADDRESS


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one grid cell; in a single run, print its metrics or a clean error; in a sweep,
    write the job's outcome into its folder (and return a tuning trial's objective)."""
    hydra_cfg = HydraConfig.get()
    choices = cast(dict[str, str], OmegaConf.to_container(hydra_cfg.runtime.choices))
    record: Mapping[str, Any]
    try:
        record = run_cell(to_cell(cfg), choices)
    except ConfigError as err:  # a value out of range: no identity, named by its overrides
        record = {"status": "failed", "error": f"ConfigError: {err}",
                  "cell": {"job": " ".join(hydra_cfg.overrides.task) or "(no overrides)"}}
    if hydra_cfg.mode == RunMode.RUN:
        print_cell(record)
        if record["status"] in (Status.FAILED, Status.NOT_APPLICABLE):
            sys.exit(1)
        return None
    write_outcome(hydra_cfg.runtime.output_dir, Outcome.of(record))  # what the sweep reads back
    if cfg.get("objective"):  # experiment=tune: the sweeper wants a number
        return objective_value(record, cfg.objective)
    return None


def run_reporting_faults() -> None:
    """``main()``, with a fault in Hydra's own writes (a job folder on a disk that filled up)
    ending in one paragraph instead of Hydra's traceback; Hydra's usage errors are printed
    as Hydra prints them. ``HYDRA_FULL_ERROR=1`` set by the user keeps Hydra's behaviour."""
    if os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing a traceback
    try:
        main()
    except CompactHydraException as err:  # a usage error (override syntax, unknown preset...)
        print(f"{err}" + (f"\n{err.__cause__}" if err.__cause__ else ""), file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # Hydra's own writes: a job folder on a full or read-only disk
        where = err.filename or f"a file under {PROGRESS['output_dir']}"
        stop_writing(f"{where} cannot be written ({err.strerror or err}); free some space or fix the "
                     "folder.", PROGRESS["done"], PROGRESS["total"])


if __name__ == "__main__":
    run_reporting_faults()
