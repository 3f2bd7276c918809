"""Checks made once the configuration is composed and before anything is written (Hydra
creates its run folder right after): names that become folders, and output folders that
can be written on a disk with room. A problem ends the run with one paragraph, status 1."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig

from app.console import error_paragraph
from benchmark.config import ConfigError, check_known_options, resolve_path
from benchmark.identity import check_name
from benchmark.provenance import REPO_ROOT

MIN_FREE_MB = 64  # records, derived data, compiled programs and the report of a small sweep
PREFLIGHT_FAILED = 1


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a new one would go in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(folder: Path, option: str) -> str | None:
    """Why nothing can be written under ``folder`` (the option that names it), or None."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        return f"{option}={folder}: {existing} is a file, not a folder; choose another {option}."
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return (f"{option}={folder}: {existing} cannot be written ({err.strerror or err}); choose "
                f"a writable {option}. A finished sweep's report can still be read where it is: "
                f"python -m reports <its runs folder>.")
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < MIN_FREE_MB:
        return (f"{option}={folder}: the disk holding {existing} has {free_mb:.1f} MB free; a run "
                f"needs at least {MIN_FREE_MB} MB (records, derived data, compiled programs, the "
                f"report). Free some space or choose another {option}.")
    return None


def problems(config: DictConfig, hydra_dir: tuple[str, str]) -> list[str]:
    """Everything that would make the run fail or write outside its folders."""
    found = []
    try:
        check_known_options(config)
        check_name(config.experiment_name, "experiment_name")
    except ConfigError as err:
        found.append(str(err))
        return found  # the folders below are named after it
    folders = {"output_dir": config.output_dir, "results_dir": config.results_dir,
               hydra_dir[0]: hydra_dir[1]}
    seen: set[Path] = set()
    for option, folder in folders.items():
        existing = nearest_existing(resolve_path(folder, REPO_ROOT))
        if existing in seen:
            continue
        seen.add(existing)
        problem = folder_problem(resolve_path(folder, REPO_ROOT), option)
        if problem:
            found.append(problem)
    return found


def check_before_writing(config: DictConfig, hydra_dir: tuple[str, str]) -> None:
    """``hydra_dir``: (option, folder) of Hydra's run or sweep folder. Print the problems as
    one paragraph each and exit with status 1, or return."""
    found = problems(config, hydra_dir)
    if found:
        print("\n".join(f"l2d-bench: {error_paragraph(p)}" for p in found), file=sys.stderr,
              flush=True)
        sys.exit(PREFLIGHT_FAILED)


def stop_writing(problem: str, done: int, total: int | None) -> NoReturn:
    """End a run whose output can no longer be written: one paragraph (how far it got, the
    problem, that finished records are intact and how to resume), status 1."""
    what = f"the sweep stopped after {done} of {total or '?'} cells" if total or done else "the run stopped"
    print("l2d-bench: " + error_paragraph(
        f"{what}: {problem} The finished cells' records are intact; re-run the same command to "
        "resume."), file=sys.stderr, flush=True)
    sys.exit(PREFLIGHT_FAILED)


def stop_if_unwritable(config: DictConfig, done: int, total: int | None) -> None:
    """After a sweep's job, before the next (Hydra writes the job's folder first): end the
    sweep with one paragraph when its output folder filled up or became read-only."""
    problem = folder_problem(resolve_path(config.output_dir, REPO_ROOT), "output_dir")
    if problem:
        stop_writing(problem, done, total)
