"""Reading and writing result records (``core.spec.ResultRecord``): the one loader.

The runner writes records with ``write_record``; the runner's skip check, tracking, the
console and the reports read them with ``read_record`` / ``load_records``.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.spec import RECORD_NAME, ResultRecord, check_record
from core.files import atomic_write_text


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
        records.append({**check_record(data, str(path)), "path": str(path)})
    return records
