"""Hydra callback for sweeps: a progress bar over cells and the report at the end."""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def _count(key: str, value: str) -> int | None:
    """How many values a sweep override like ``a,b,c`` or ``glob(*)`` takes (None: unknown)."""
    value = str(value).strip()
    if value.startswith("glob("):
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        override = OverridesParser.create().parse_override(f"{key}={value}")
        options = GlobalHydra.instance().config_loader().get_group_options(key)
        return len(list(override.value().filter(options)))
    if "(" in value:
        return None
    return len(value.split(","))


def sweep_size(config: DictConfig) -> int | None:
    """Number of cells the basic sweeper will run (None if it cannot be told)."""
    params = {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}
    for override in config.hydra.overrides.task:
        key, _, value = override.partition("=")
        params[key.lstrip("+~")] = value
    total = 1
    for key, value in params.items():
        count = _count(key, value)
        if count is None:
            return None
        total *= count
    return total


class SweepCallback(Callback):
    """Counts cells as they finish; at the end writes and prints the leaderboard."""

    def __init__(self) -> None:
        self.bar = None
        self.outcomes: list[dict[str, Any]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=sweep_size(config), desc="grid", unit="cell", file=sys.stderr)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        try:
            outcome = job_return.return_value
        except Exception as err:  # the task itself crashed
            outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}", "cell": {}}
        self.outcomes.append(outcome)
        if self.bar is not None:
            failed = sum(o["status"] == "failed" for o in self.outcomes)
            skipped = sum(o["status"] == "skipped" for o in self.outcomes)
            self.bar.set_postfix(failed=failed, skipped=skipped)
            self.bar.update()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from benchmark.console import error_paragraph
        from benchmark.config import resolve_path
        from benchmark.provenance import REPO_ROOT

        if self.bar is not None:
            self.bar.close()
        failed = [o for o in self.outcomes if o["status"] == "failed"]
        if self.outcomes and len(failed) == len(self.outcomes):
            print(f"\nAll {len(failed)} cells failed. First error:\n"
                  f"{error_paragraph(failed[0]['error'])}", file=sys.stderr)
            sys.exit(1)
        results_dir = resolve_path(config.results_dir, REPO_ROOT)
        report_dir = resolve_path(config.report_dir, REPO_ROOT)
        from reports import build_report

        written = build_report(results_dir, report_dir)
        print("\n" + written["leaderboard.txt"].read_text())
        print(f"Report: {written['report.html']}")
        if failed:
            print(f"\n{len(failed)} of {len(self.outcomes)} cells failed:", file=sys.stderr)
            for outcome in failed[:10]:
                cell = ", ".join(f"{k}={v}" for k, v in outcome["cell"].items())
                print(f"- {cell}: {error_paragraph(outcome['error'])}", file=sys.stderr)
            sys.exit(1)
