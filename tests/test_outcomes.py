"""A job's outcome: one typed value, written beside the job's Hydra files and read back from
there by the sweep, whatever process ran the job."""

from __future__ import annotations

import io
from contextlib import redirect_stderr

from hydra.types import RunMode
from omegaconf import OmegaConf

from app.callbacks import SweepCallback, summary_lines
from core.records import clear_outcomes, read_outcome, read_outcomes, write_outcome
from core.spec import Outcome, Status


def test_an_outcome_reads_back_as_written(tmp_path):
    outcome = Outcome(Status.NOT_APPLICABLE, {"method": "x", "missing_policy": "drop"}, error="why")
    write_outcome(tmp_path / "3", outcome)
    assert read_outcome(tmp_path / "3") == outcome
    assert read_outcome(tmp_path / "4") is None


def test_a_sweep_reads_its_jobs_in_job_order_and_skips_half_written_ones(tmp_path):
    for job in (10, 2, 0, 1):
        write_outcome(tmp_path / str(job), Outcome(Status.OK, {"seed": job}))
    (tmp_path / "11").mkdir()
    (tmp_path / "11" / "outcome.json").write_text('{"status": "ok", "ce')  # killed mid-write
    assert [o.cell["seed"] for o in read_outcomes(tmp_path)] == [0, 1, 2, 10]
    clear_outcomes(tmp_path)  # a new sweep in the same folder counts its own jobs only
    assert read_outcomes(tmp_path) == []


def test_a_crashed_job_is_written_as_failed_under_its_overrides(tmp_path):
    """The task raised before writing its outcome: the callback writes the failure, so the
    summary reads it from the sweep's folder like every other job's."""
    class CrashedJob:  # as Hydra's JobReturn: reading the value re-raises the task's error
        overrides = ["seed=3", "method=x"]

        @property
        def return_value(self):
            raise RuntimeError("boom")

    job_return = CrashedJob()
    config = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(tmp_path / "7")}}})
    stderr = io.StringIO()
    with redirect_stderr(stderr):  # a job's own process (no bar): one line
        SweepCallback().on_job_end(config, job_return)
    assert stderr.getvalue().strip() == "[grid] failed: job=seed=3 method=x"
    (outcome,) = read_outcomes(tmp_path)
    assert outcome == Outcome(Status.FAILED, {"job": "seed=3 method=x"}, error="RuntimeError: boom")
    assert summary_lines([outcome, Outcome(Status.OK, {"seed": 1})], None) == [
        "1 of 2 cells failed:", "- job=seed=3 method=x: RuntimeError: boom"]


def test_a_single_run_writes_no_outcome_and_prints_no_grid_line(tmp_path):
    config = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "runtime": {"output_dir": str(tmp_path)}}})
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        SweepCallback().on_job_end(config, object())
    assert stderr.getvalue() == "" and read_outcome(tmp_path) is None
