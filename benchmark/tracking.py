"""MLflow tracking: the only module that imports mlflow.

One MLflow run per grid cell (found by the cell key, ``benchmark.spec.CellKey``): params
(cell, method, training), metrics per decision rule (``argmax/accuracy``, ``constrained/accuracy``...), the accuracy-coverage curve and the
provenance as JSON artifacts, and the result record itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from benchmark.identity import stable_hash
from benchmark.spec import ResultRecord


class Tracker:
    """Logs result records to MLflow (``enabled: false`` makes it a no-op)."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.enabled = bool(cfg.get("enabled", False))
        self.uri = cfg.get("uri")
        self.experiment = cfg.get("experiment", "l2d-bench")
        self.artifact_location = cfg.get("artifact_location")
        self._ready = False

    def _setup(self) -> None:
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        if self.uri:
            mlflow.set_tracking_uri(self.uri)
        if mlflow.get_experiment_by_name(self.experiment) is None and self.artifact_location:
            # an SQLite store would otherwise put artifacts in ./mlruns of the current dir
            Path(self.artifact_location).mkdir(parents=True, exist_ok=True)
            mlflow.create_experiment(self.experiment, artifact_location=Path(self.artifact_location).resolve().as_uri())
        mlflow.set_experiment(self.experiment)
        self._ready = True

    def log(self, record: ResultRecord, cfg: Mapping[str, Any]) -> str | None:
        """Log one cell's record as the cell's only run; returns its id (None when disabled).

        Runs are found by the ``cell_id`` tag (a hash of the cell key): an earlier run of
        the same cell (a ``force=true`` re-run, a failed attempt) is deleted and replaced.
        """
        if not self.enabled:
            return None
        import mlflow

        if not self._ready:
            self._setup()
        cell = record["cell"]
        cell_id = stable_hash(dict(cell))
        for old in mlflow.search_runs(filter_string=f"tags.cell_id = '{cell_id}'", output_format="list"):
            mlflow.delete_run(old.info.run_id)
        name = "-".join(str(cell[k]) for k in ("method", "dataset", "missing_rate", "workload", "seed"))
        params = {**cell, "method_name": record["method_name"],
                  **{f"method.{k}": v for k, v in ((cfg.get("method") or {}).get("params") or {}).items()},
                  **{f"train.{k}": v for k, v in (cfg.get("train") or {}).items()}}
        with mlflow.start_run(run_name=name[:250]) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            metrics = {}
            for rule, values in (record.get("metrics") or {}).items():
                metrics.update({f"{rule}/{k}": v for k, v in values.items() if v is not None})
            metrics.update({k: v for k, v in (record.get("run_metrics") or {}).items() if v is not None})
            if metrics:
                mlflow.log_metrics(metrics)
            mlflow.set_tags({"status": record["status"], "cell_id": cell_id,
                             **{k: str(v)[:5000] for k, v in cell.items()}})
            if record.get("error"):
                mlflow.set_tag("error", record["error"][:5000])
            if record.get("curves"):
                mlflow.log_dict(record["curves"], "curves.json")
            mlflow.log_dict(record.get("provenance") or {}, "provenance.json")
            return run.info.run_id
