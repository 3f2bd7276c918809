"""Entry point: ``python -m app [hydra overrides]`` (what ``./run.sh`` calls)."""

from __future__ import annotations

import os
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from app.callbacks import OUTCOMES, PROGRESS, outcome_of
from app.console import print_cell
from app.launchers import register_ray_launcher_config
from app.tuning import objective_value
from benchmark.config import ConfigError, register_configs, to_cell
from benchmark.runner import run_cell
from core.spec import NOT_APPLICABLE

register_configs()  # the typed schema and method=<name> for every registered method
register_ray_launcher_config()  # hydra/launcher=ray: local on 127.0.0.1, or RAY_ADDRESS
INTERRUPTED = 130  # the shell's exit status for Ctrl-C


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


def interrupted_message() -> str:
    """One line: how far a sweep got and how to resume it."""
    done, total = PROGRESS["done"], PROGRESS["total"]
    where = f" after {done} of {total if total is not None else '?'} cells" if total or done else ""
    return f"interrupted{where}; re-run the same command to resume (finished cells are kept)."


def stop_on_interrupt(signum: int, frame) -> None:
    """The one path of Ctrl-C (SIGINT): say how far the sweep got and leave at once with the
    shell's status 130. No exception unwinds through JAX, XLA or a garbage-collection callback
    (where it could be swallowed, or the interpreter crash at teardown): records, caches and
    reports are written atomically and locks die with the process, so nothing is half-made."""
    print(f"\n{interrupted_message()}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(INTERRUPTED)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, stop_on_interrupt)
    main()
