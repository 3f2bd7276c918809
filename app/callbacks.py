"""Hydra callback for sweeps: a progress bar over cells and the report at the end."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from app.console import error_paragraph
from app.interrupt import PROGRESS
from app.launchers import keep_local_ray_on_loopback
from app.preflight import check_before_writing, stop_if_unwritable
from app.tuning import write_tuned_preset
from benchmark.config import resolve_path
from benchmark.provenance import REPO_ROOT
from benchmark.tracking import StoreNeedsRepair, Tracker, import_mlflow, local_store
from core.records import NoRecordsError, clear_outcomes, load_records, read_outcome, read_outcomes, write_outcome
from core.spec import RECORD_NAME, Outcome, Status
from reports import ReportError, build_report


def _count(key: str, value: str) -> int | None:
    """How many values a sweep override (``a,b,c``, ``range(10)``, ``glob(*)``) takes;
    None when it cannot be told (an interval)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    try:
        override = OverridesParser.create().parse_override(f"{key}={value}")
        parsed = override.value()
        if isinstance(parsed, Glob):
            from hydra.core.global_hydra import GlobalHydra

            options = GlobalHydra.instance().config_loader().get_group_options(key)
            return len(list(parsed.filter(options)))
        if not override.is_sweep_override():
            return 1
        return len(list(override.sweep_string_iterator()))
    except Exception:  # an interval sweep, or a syntax only the sweeper knows
        return None


def sweep_size(config: DictConfig) -> int | None:
    """Number of cells the sweep will run (None if it cannot be told)."""
    if config.hydra.sweeper.get("n_trials") is not None:  # a search (experiment=tune)
        return int(config.hydra.sweeper.n_trials)
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


def summary_lines(outcomes: list[Outcome], tracking_problem: str | None) -> list[str]:
    """The end-of-sweep summary: failed cells and tracking errors (empty when all is well)."""

    lines = []
    failed = [o for o in outcomes if o.status == Status.FAILED]
    if failed:
        lines.append(f"{len(failed)} of {len(outcomes)} cells failed:")
        lines += [f"- {o.cell_text()}: {error_paragraph(o.error or '?')}" for o in failed[:10]]
        if len(failed) > 10:
            lines.append(f"- ... and {len(failed) - 10} more (see the report's failures)")
    tracked = [o for o in outcomes if o.tracking_error]
    if tracking_problem:
        lines.append(f"MLflow: {tracking_problem}; the records are complete.")
    elif tracked:
        lines.append(f"MLflow: {len(tracked)} cells were not tracked (their records are complete):")
        lines += [f"- {o.cell_text()}: {error_paragraph(o.tracking_error or '?')}" for o in tracked[:5]]
    again = sum(o.tracked_again for o in outcomes)
    if again:
        lines.append(f"MLflow: {again} finished cells were tracked again (their runs were not in "
                     "the store).")
    return lines


def report_is_current(results_dir, report_dir) -> bool:
    """Whether the report was written after every record below ``results_dir``."""

    page, text = report_dir / "report.html", report_dir / "leaderboard.txt"
    if not page.is_file() or not text.is_file():
        return False
    newest = max((p.stat().st_mtime for p in results_dir.rglob(RECORD_NAME)), default=0.0)
    return min(page.stat().st_mtime, text.stat().st_mtime) >= newest


class SweepCallback(Callback):
    """Prepares tracking once, counts cells as they finish, and at the end prints the
    leaderboard, the failed cells and the tracking errors."""

    def __init__(self) -> None:
        self.bar = None  # only in the sweep's own process (jobs may run in others, with a copy)
        self.counts = {status: 0 for status in Status}  # the jobs ended, counted by the bar
        self.tracking_problem: str | None = None
        self.preparing: threading.Thread | None = None  # creating a local tracking store

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_before_writing(config, ("hydra.run.dir", config.hydra.run.dir))
        PROGRESS.update(output_dir=resolve_path(config.output_dir, REPO_ROOT))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        check_before_writing(config, ("hydra.sweep.dir", config.hydra.sweep.dir))

        keep_local_ray_on_loopback(config.hydra.launcher)
        tracker = Tracker(config.get("tracking") or {})
        if tracker.enabled:
            import_mlflow()  # once, here: never imported by two threads at the same time
        if local_store(tracker.uri) is not None:
            try:  # a store MLflow cannot open that may hold runs: stop before any cell runs
                tracker.check_store()
            except StoreNeedsRepair as err:
                print(f"[l2d-bench] {err}", file=sys.stderr)
                sys.exit(1)
            # create and migrate a local store (seconds) while the first cell trains: every
            # job's tracking takes the same store lock, so none can use it half-made
            self.preparing = threading.Thread(target=self._prepare_tracking, args=(tracker,),
                                              daemon=True)
            self.preparing.start()
        else:  # a server: find out before any job whether it answers (3 s at most)
            self._prepare_tracking(tracker)
        clear_outcomes(config.hydra.sweep.dir)
        PROGRESS.update(done=0, total=sweep_size(config), sweep_dir=Path(config.hydra.sweep.dir),
                        output_dir=resolve_path(config.output_dir, REPO_ROOT))
        # a live bar in a terminal; in a log file (not a TTY) one plain line per cell instead
        self.bar = tqdm(total=PROGRESS["total"], desc="grid", unit="cell", file=sys.stderr,
                        disable=None)

    def __getstate__(self) -> dict[str, Any]:
        """What a job's process gets (launchers pickle the callback): no bar, no thread."""
        return {**self.__dict__, "bar": None, "preparing": None}

    def _prepare_tracking(self, tracker) -> None:
        """Create the store and the experiment; note (and print) why tracking is off if so."""
        try:
            self.tracking_problem = tracker.prepare()
        except Exception as err:  # the records never depend on tracking
            self.tracking_problem = f"the tracking store cannot be prepared ({type(err).__name__}: {err})"
        if self.tracking_problem:
            print(f"[l2d-bench] {self.tracking_problem}", file=sys.stderr)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Count the job by the outcome it wrote (written here if the task itself crashed)."""
        if config.hydra.mode == RunMode.RUN:  # a single run prints its own result
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        outcome = read_outcome(job_dir)
        if outcome is None:  # the task raised before writing its outcome
            try:
                error = f"the job ended without an outcome (it returned {job_return.return_value!r})"
            except Exception as err:  # reading the value re-raises what the task raised
                error = f"{type(err).__name__}: {err}"
            overrides = " ".join(getattr(job_return, "overrides", None) or []) or "?"
            outcome = Outcome(Status.FAILED, {"job": overrides}, error=error)
            write_outcome(job_dir, outcome)
        if self.bar is None:  # a job's own process (joblib, submitit, Ray): one line, no counts
            print(f"[grid] {outcome.status}: {outcome.cell_text()}", file=sys.stderr, flush=True)
            return
        self.counts[outcome.status] += 1
        PROGRESS["done"] = done = sum(self.counts.values())
        failed = self.counts[Status.FAILED]
        skipped = self.counts[Status.SKIPPED] + self.counts[Status.NOT_APPLICABLE]
        if not self.bar.disable:
            self.bar.set_postfix(failed=failed, skipped=skipped)
            self.bar.update()
        else:
            print(f"[grid] {done}/{PROGRESS['total'] or '?'} {outcome.status}: {outcome.cell_text()} "
                  f"({failed} failed, {skipped} skipped so far)", file=sys.stderr, flush=True)
        if PROGRESS["total"] is None or done < PROGRESS["total"]:
            # Hydra writes the next job's folder before any callback: stop here if it cannot
            stop_if_unwritable(config, done, PROGRESS["total"])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.preparing is not None:
            self.preparing.join()
        results_dir = resolve_path(config.results_dir, REPO_ROOT)
        outcomes = read_outcomes(config.hydra.sweep.dir)  # whatever process ran each job
        failed = any(o.status == Status.FAILED for o in outcomes)
        if config.get("objective"):  # tuning: no test-set report of the trials, only the choice
            preset = write_tuned_preset(config, resolve_path(config.tuned_dir, REPO_ROOT))
            if preset is not None:
                print(f"\nTuned preset (used by later runs of this dataset and method): {preset}\n"
                      + preset.read_text())
        else:
            report_dir = resolve_path(config.report_dir, REPO_ROOT)
            failed = not self._show_report(results_dir, report_dir, outcomes) or failed
            self._track_sweep(config, results_dir, report_dir)
        lines = summary_lines(outcomes, self.tracking_problem)
        if lines:
            print("\n" + "\n".join(lines), file=sys.stderr)
        if failed and not config.get("objective"):
            sys.exit(1)

    def _track_sweep(self, config: DictConfig, results_dir, report_dir) -> None:
        """A parent MLflow run for the sweep, holding the report; the cells' runs its children."""
        tracker = Tracker(config.get("tracking") or {})
        if not tracker.enabled or self.tracking_problem:
            return
        try:
            runs = [str(r["mlflow_run_id"]) for r in load_records(results_dir) if r.get("mlflow_run_id")]
            tracker.log_sweep(str(config.experiment_name), report_dir, runs)
        except Exception as err:  # the records and the report never depend on tracking
            self.tracking_problem = f"the sweep's parent run was not logged ({type(err).__name__}: {err})"

    def _show_report(self, results_dir, report_dir, outcomes: list[Outcome]) -> bool:
        """Print the leaderboard, rebuilding the report unless every cell was already done;
        False when the report could not be written."""
        unchanged = all(o.status in (Status.SKIPPED, Status.NOT_APPLICABLE) for o in outcomes)
        try:
            if unchanged and report_is_current(results_dir, report_dir):
                print("\n" + (report_dir / "leaderboard.txt").read_text())
                print(f"Report (unchanged: every cell was already done): {report_dir / 'report.html'}")
            else:
                written = build_report(results_dir, report_dir)
                print("\n" + written["leaderboard.txt"].read_text())
                print(f"Report: {written['report.html']}")
        except NoRecordsError:
            print("\nNo cell finished, so there is no report.", file=sys.stderr)
        except (OSError, ValueError, ReportError) as err:  # one message; the sweep exits 1
            print(f"\nThe report could not be written: {type(err).__name__}: {err}", file=sys.stderr)
            return False
        return True
