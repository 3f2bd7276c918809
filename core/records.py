"""Reading and writing result records (``core.spec.ResultRecord``): the one loader; and
the jobs' outcomes (``core.spec.Outcome``), which a sweep reads back from its folder.

The runner writes records with ``write_record``; the runner's skip check, tracking, the
console and the reports read them with ``read_record`` / ``load_records``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import cast

from core.files import atomic_write_text
from core.spec import RECORD_NAME, Outcome, ResultRecord, check_record


class NoRecordsError(FileNotFoundError):
    """A run directory holds no result records (or does not exist)."""


def write_record(path: Path, record: ResultRecord) -> None:
    """Write ``record`` atomically as JSON (a kill never leaves half a record)."""
    atomic_write_text(path, json.dumps(check_record(record, str(path)), indent=1, default=float))


def read_record(path: Path) -> ResultRecord | None:
    """The record at ``path``; None if absent, unreadable or of another schema."""
    try:
        return check_record(json.loads(Path(path).read_text()), str(path))
    except (OSError, ValueError):
        return None


def load_records(run_dir: str | Path) -> list[ResultRecord]:
    """Every record below ``run_dir`` (recursively, in path order), each with its ``path``.

    Raises ``NoRecordsError`` when the directory does not exist and ``ValueError`` naming
    the file for an unreadable or malformed record. A directory without records gives [].
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NoRecordsError(f"run directory does not exist: {run_dir}")
    records = []
    for path in sorted(run_dir.rglob(RECORD_NAME)):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read result record: {error}") from error
        records.append(cast(ResultRecord, {**check_record(data, str(path)), "path": str(path)}))
    return records


OUTCOME_NAME = "outcome.json"  # a job's outcome, in the job's own Hydra folder


def write_outcome(job_dir: str | Path, outcome: Outcome) -> None:
    """Write a job's outcome into its folder (atomically)."""
    atomic_write_text(Path(job_dir) / OUTCOME_NAME, json.dumps(dataclasses.asdict(outcome), default=str))


def clear_outcomes(sweep_dir: str | Path) -> None:
    """Remove the outcomes an earlier sweep left in ``sweep_dir`` (a fixed ``hydra.sweep.dir``
    reused), so a sweep counts and summarises its own jobs only."""
    for path in Path(sweep_dir).glob(f"*/{OUTCOME_NAME}"):
        path.unlink(missing_ok=True)


def read_outcome(job_dir: str | Path) -> Outcome | None:
    """The outcome a job wrote into its folder; None when it wrote none (or half of one)."""
    try:
        return Outcome.of(json.loads((Path(job_dir) / OUTCOME_NAME).read_text()))
    except (OSError, ValueError, KeyError):
        return None


def read_outcomes(sweep_dir: str | Path) -> list[Outcome]:
    """The outcomes of a sweep's jobs (``<sweep_dir>/<job number>/outcome.json``), in job
    order; [] before the first job ends."""
    jobs = sorted((path.parent for path in Path(sweep_dir).glob(f"*/{OUTCOME_NAME}")),
                  key=lambda job: (len(job.name), job.name))
    return [outcome for outcome in map(read_outcome, jobs) if outcome is not None]
