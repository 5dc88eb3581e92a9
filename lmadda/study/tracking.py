"""The study's results in MLflow: one experiment per study experiment, one run per evaluated model.

A model run carries params (target, method, matched layers, lr, seed, shift) and metrics: Pearson,
SSIM, PSNR and NRMSE per marker and averaged over the test images, the collapse flags and every
label-free criterion (`lf_*`). A profile run per target holds the zero-training discrepancy profile
(`discrepancy_<layer>`) and the layer it predicts. The experiment's own run holds its sample panels and the
robust source model's admission (`robust_*`). `docs/study.md` is written from these runs
(`read_study`), so the document shows what the tracking store holds, not what a process remembered.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from lmadda.evaluation.metrics import is_finite
from lmadda.evaluation.rows import model_metrics, model_params
from lmadda.core.tracking_store import (FINISHED, all_runs, ensure_experiment, keeps_tracking_env, one_finished_run_per_key,
                                   relocate_artifacts)



def model_key(row: dict) -> str:
    lr = "-" if row.get("lr") is None or (isinstance(row["lr"], float) and math.isnan(row["lr"])) else f"{row['lr']:g}"
    return f"{row['target']}|{row['method']}|{row.get('matched') or row['layer']}|{lr}|{row['seed']}"



class StudyTracker:
    """Logs the models of one experiment; logging is idempotent (a model already logged is skipped)."""

    @keeps_tracking_env  # the study names its store; a later sweep in the same process reads the user's own
    def __init__(self, tracking_uri: str, experiment: str, storage: Path):
        self.experiment = ensure_experiment(tracking_uri, experiment, storage)
        self.client = MlflowClient(tracking_uri)
        # A model counts as logged once its run has FINISHED; a run an interrupted study left RUNNING is
        # deleted here, so the model is logged again whole.
        kept = one_finished_run_per_key(self.client, all_runs(self.client, self.experiment.experiment_id), "lmadda.key")
        self._runs: dict[str, str] = {key: run.info.run_id for key, run in kept.items()}

    def sync(self, rows: list[dict]) -> int:
        """Log every model of `rows` (per image x marker) that has no run yet; returns how many were new."""
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            groups[model_key(row)].append(row)
        new = 0
        for key, group in groups.items():
            if key not in self._runs:
                self._log_model(key, group)
                new += 1
        return new

    def _log_model(self, key: str, rows: list[dict]) -> None:
        self._new_run(key, "model", model_params(rows[0]), model_metrics(rows), name=key.replace("|", " "))

    def _new_run(self, key: str, kind: str, params: dict, metrics: dict[str, float], name: str) -> None:
        run = self.client.create_run(self.experiment.experiment_id, run_name=name,
                                     tags={"lmadda.kind": kind, "lmadda.key": key})
        self.client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                              params=[Param(k, "" if v is None else str(v)) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id)
        self._runs[key] = run.info.run_id

    def forget(self, keys: set[str]) -> None:
        """Delete the runs of these models (MLflow keeps them as deleted runs, out of every search)."""
        for key in keys & set(self._runs):
            self.client.delete_run(self._runs.pop(key))

    def has(self, key: str) -> bool:
        return key in self._runs

    def add_metrics(self, key: str, metrics: dict[str, float]) -> None:
        """Criteria that need several models (ensemble disagreement), added once they all exist."""
        finite = [Metric(k, float(v), 0, 0) for k, v in metrics.items() if is_finite(v)]
        if key in self._runs and finite:
            self.client.log_batch(self._runs[key], metrics=finite)

    def log_profile(self, target: str, profile: list[float], predicted_layer: int) -> None:
        key = f"profile|{target}"
        if key in self._runs:
            return
        metrics = {f"discrepancy_{layer:02d}": value for layer, value in enumerate(profile) if is_finite(value)}
        metrics["predicted_layer"] = float(predicted_layer)
        self._new_run(key, "profile", {"target": target}, metrics, name=f"profile {target}")

    def log_artifact(self, path: Path, folder: str) -> None:
        """Figures made while the models exist (sample panels) go to the experiment's own run."""
        self.client.log_artifact(self._experiment_run(), str(path), folder)

    def log_facts(self, metrics: dict[str, float]) -> None:
        """Figures about the experiment as a whole (the robust model's admission) on its own run; a rerun's
        values replace the earlier ones (MLflow reads the value with the latest timestamp)."""
        now = int(time.time() * 1000)
        self.client.log_batch(self._experiment_run(), metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if is_finite(v)])

    def _experiment_run(self) -> str:
        key = "experiment"
        if key not in self._runs:
            self._new_run(key, "experiment", {}, {}, name="experiment")
        return self._runs[key]


class StudyRecord(NamedTuple):
    models: list[dict]  # one per model: its params and metrics (pearson marker-averaged)
    profiles: list[dict]  # one per target: its discrepancy profile and predicted layer
    artifacts: Path | None  # local artifact folder of the experiment run (sample panels)
    facts: dict[str, float]  # the experiment run's metrics (the robust model's admission)


def read_study(tracking_uri: str, experiment: str) -> StudyRecord:
    """What the tracking store holds about one experiment."""
    relocate_artifacts(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return StudyRecord([], [], None, {})
    models, profiles, artifacts, facts = [], [], None, {}
    for run in all_runs(client, found.experiment_id):
        if run.info.status != FINISHED:
            continue  # left by an interrupted study; the next run of the study logs it again
        kind = run.data.tags.get("lmadda.kind")
        if kind == "model":
            params = run.data.params
            models.append({
                "target": params["target"], "setting": params["setting"], "shift": params["shift"],
                "magnitude": float(params["magnitude"]) if params.get("magnitude") not in ("", "None", None) else float("nan"),
                "method": params["method"], "layer": int(params["layer"]), "matched": params["matched"],
                "lr": float(params["lr"]) if params.get("lr") not in ("", "None", None) else None,
                "seed": int(params["seed"]), **run.data.metrics,
            })
        elif kind == "profile":
            metrics = run.data.metrics
            layers = sorted(int(name.split("_")[1]) for name in metrics if name.startswith("discrepancy_"))
            profiles.append({"target": run.data.params["target"], "predicted_layer": int(metrics["predicted_layer"]),
                             "profile": [metrics[f"discrepancy_{layer:02d}"] for layer in layers]})
        elif kind == "experiment":
            facts = dict(run.data.metrics)
            if run.info.artifact_uri.startswith("file:"):
                from urllib.parse import unquote, urlparse

                artifacts = Path(unquote(urlparse(run.info.artifact_uri).path))
    return StudyRecord(models, profiles, artifacts, facts)
