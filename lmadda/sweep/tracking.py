"""MLflow tracking of a sweep: one experiment per sweep, one parent run per sweep, one nested run per trial, and the
comparison table `lmadda runs compare` prints.

Trial runs carry params (the trial's grid point and adaptation options), metrics (the g/d loss and D
accuracy curves by step, the final Pearson per marker when labels exist), tags (marker list, setting,
shift, layer, collapsed) and the adapted generator as an artifact in lmadda's own checkpoint format
(state dict + config, any image size; MLflow's default pt2 export would fix the input shape).
Promoting the chosen generators into the model registry is `lmadda.sweep.promotion`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_REPO_URL, MLFLOW_MODEL_VERSIONS, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_SOURCE_NAME

from lmadda.core.errors import LmaddaError
from lmadda.core.registry_names import alias_for, file_sha256
from lmadda.core.tracking_store import (FINISHED, all_runs, delete_run, ensure_experiment, keeps_tracking_env, one_finished_run_per_key,
                                        relocate_artifacts)
from lmadda.evaluation.metrics import is_finite
from lmadda.evaluation.rows import model_metrics, model_params

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ARTIFACT_DIR = "generator"
# MLflow tags a run with the script that started it and the local clone's remote; on a store that other machines read,
# those are this machine's folders. The runs say what made them instead (their params say with what).
SOURCE_TAGS = {MLFLOW_SOURCE_NAME: "lmadda", MLFLOW_GIT_REPO_URL: ""}


def input_params(name: str, path: Path) -> dict[str, str]:
    """An input file as run params: its name and SHA-256 (empty where the file is gone), not where it lay on the
    machine that ran the sweep, which means nothing to another machine and tells the store about this one's folders."""
    path = Path(path)
    return {name: path.name, f"{name}_sha256": file_sha256(path) if path.is_file() else ""}


@keeps_tracking_env
def log_sweep(sweep, rows: list[dict], result_files: list[Path], log=print, *, unadapted: dict | None = None,
              report_files: list[Path] = ()) -> str:
    """Log every trial as a nested run; return the parent run id. A resumed sweep logs only new trials.

    A trial run holds what a study's model run holds (`lmadda.evaluation.rows.model_params` and `model_metrics` of
    its result rows, in `_rows`), plus its loss curves by step, its steps done and its generator file; the
    parent run holds `result_files` (the result rows and the grid points' table) and the report.

    Runs are created with their tags, and a trial counts as logged only once its run has FINISHED:
    a run a killed driver left behind (RUNNING, or untagged from before tags were set at creation) is
    deleted here and its trial logged again, so any kill and resume ends with one finished run per trial.
    """
    experiment = ensure_experiment(sweep.tracking_uri, sweep.experiment, sweep.storage_path)
    client = MlflowClient(tracking_uri=sweep.tracking_uri, registry_uri=sweep.tracking_uri)  # never a registry resolved elsewhere
    runs = all_runs(client, experiment.experiment_id)
    parents = sorted((r for r in runs if r.data.tags.get("lmadda.kind") == "sweep" and r.data.tags.get("lmadda.sweep") == sweep.name),
                     key=lambda r: r.info.start_time or 0)
    parent_id = parents[0].info.run_id if parents else None
    for run in runs:
        tags = run.data.tags
        untagged_child = parent_id is not None and tags.get(MLFLOW_PARENT_RUN_ID) == parent_id
        untagged_parent = tags.get(MLFLOW_RUN_NAME) == sweep.name and run.info.status != FINISHED
        if "lmadda.kind" not in tags and (untagged_child or untagged_parent):
            log(f"[sweep] MLflow: deleting run {run.info.run_id} ({tags.get(MLFLOW_RUN_NAME)}), left without tags by an interrupted sweep")
            delete_run(client, run)
    logged = one_finished_run_per_key(client, [r for r in runs if r.data.tags.get("lmadda.kind") == "trial"], "lmadda.trial_key", log)
    sweep_tags = {"lmadda.kind": "sweep", "lmadda.sweep": sweep.name, **SOURCE_TAGS}
    with mlflow.start_run(run_id=parent_id) if parent_id else mlflow.start_run(run_name=sweep.name, tags=sweep_tags) as parent:
        if not parent_id:
            mlflow.log_params({"sweep": sweep.name, **input_params("source_checkpoint", sweep.source.checkpoint),
                               **input_params("manifest", sweep.data.manifest),
                               "source_setting": sweep.data.source_setting, "targets": ",".join(sweep.grid.targets),
                               "trials": len(rows)})
        for row in rows:
            key = f"{sweep.name}/{row['point']}"
            if key in logged or not row.get("_history"):
                continue  # already logged by an earlier run of this sweep, or never started
            tags = {"lmadda.kind": "trial", "lmadda.trial_key": key, "lmadda.sweep": sweep.name, "setting": row["setting"], "shift": row["shift"],
                    "target": row["target"], "layer": str(row["layer"]), "collapsed": str(row["collapsed"]).lower(),
                    "collapse_reason": row["collapse_reason"], "markers": ",".join(k[8:] for k in row if k.startswith("pearson_")),
                    **SOURCE_TAGS}
            measured = row.get("_rows") or []
            with mlflow.start_run(run_name=row["point"], nested=True, tags=tags):
                mlflow.log_params({**model_params(row), **{f"adapt.{k}": v for k, v in sweep.adapt.items()}})
                for record in row.get("_history", []):
                    step = int(record.get("step", 0) or 0)
                    metrics = {k: float(record[k]) for k in ("g_loss", "d_loss", "d_acc", "d_running_acc", "g_updates") if is_finite(record.get(k))}
                    mlflow.log_metrics(metrics, step=step)
                final = {k: float(v) for k, v in row.items() if k.startswith(("pearson", "lf_")) and is_finite(v)}
                if measured:  # labelled: every metric per marker, as a study's model run has them
                    final.update(model_metrics(measured))
                final["collapsed"] = float(row["collapsed"])
                final["steps_done"] = float(row["steps_done"])
                mlflow.log_metrics(final)
                if row.get("generator_path") and Path(row["generator_path"]).exists():
                    mlflow.log_artifact(row["generator_path"], artifact_path=ARTIFACT_DIR)
        for path in result_files:
            mlflow.log_artifact(str(path))
        for path in report_files:  # per-layer figures, best.parquet, the learning-rate selection
            mlflow.log_artifact(str(path), artifact_path="report" + (f"/{path.parent.name}" if path.parent.name.startswith("lr_") else ""))
        for target, metrics in (unadapted or {}).items():
            mlflow.log_metrics({f"unadapted.{alias_for(target)}.{k}": float(v) for k, v in metrics.items() if is_finite(v)})
        log(f"[sweep] MLflow: experiment {sweep.experiment!r} at {sweep.tracking_uri}, parent run {parent.info.run_id}")
        return parent.info.run_id


@keeps_tracking_env
def compare_runs(tracking_uri: str, experiment: str) -> str:
    """The comparison table of an experiment's trial runs (`mlflow.search_runs`), then its promoted generators
    (`logged_models_table`)."""
    mlflow.set_tracking_uri(tracking_uri)
    relocate_artifacts(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LmaddaError(f"no MLflow experiment {experiment!r} at {tracking_uri}; run a sweep first (or check --experiment)")
    frame = mlflow.search_runs(experiment_ids=[found.experiment_id], filter_string="tags.`lmadda.kind` = 'trial'")
    models = logged_models_table(client, found.experiment_id)
    if frame.empty and models is None:
        raise LmaddaError(f"no trial runs and no promoted generators in MLflow experiment {experiment!r} at {tracking_uri}")
    sections = []
    if not frame.empty:
        pearson_columns = sorted(c for c in frame.columns if c.startswith("metrics.pearson_"))
        lines = [f"{'target':34s} {'layer':>5} {'lr':>9} {'collapsed':>9}" + "".join(f" {c[len('metrics.'):]:>13}" for c in pearson_columns)]
        frame = frame.sort_values(["tags.target", "params.lr", "params.layer"], key=lambda s: s.map(lambda v: (len(str(v)), str(v))))
        for _, run in frame.iterrows():
            cells = "".join(f" {run[c]:13.3f}" if isinstance(run[c], float) and math.isfinite(run[c]) else f" {'':>13}" for c in pearson_columns)
            lines.append(f"{run['tags.target']:34s} {run['params.layer']:>5} {float(run['params.lr']):>9.2g} {run['tags.collapsed']:>9}{cells}")
        sections.append("\n".join(lines))
    sections.append(models or "promoted generators (MLflow LoggedModels): none; `lmadda sweep promote` makes them (versions "
                               "registered before lmadda made LoggedModels keep serving from their runs' artifacts)")
    return "\n\n".join(sections)


def logged_models_table(client: MlflowClient, experiment_id: str) -> str | None:
    """The experiment's LoggedModels, one line each: id, name, status, source run, key metrics, and the registry
    versions created from it (`lmadda-dapi v1,v2@alias`: the alias points at v2 now). None when it has none (a store
    whose promotions predate LoggedModels: its registered versions still serve, from their runs' artifacts)."""
    models, token = [], None
    while True:
        page = client.search_logged_models([experiment_id], page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            break
    if not models:
        return None
    aliases: dict[str, dict[str, list[str]]] = {}  # registered model -> version -> the aliases pointing at it now
    rows = [("model id", "name", "status", "source run", "key metrics", "registered")]
    for model in sorted(models, key=lambda m: m.creation_timestamp or 0):
        source = ""
        if model.source_run_id:
            try:
                source = f"{client.get_run(model.source_run_id).info.run_name} ({model.source_run_id[:8]})"
            except mlflow.exceptions.MlflowException:
                source = f"deleted run {model.source_run_id[:8]}"
        shown = {m.key: m.value for m in model.metrics or [] if m.key.startswith(("pearson_", "selector_"))}
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())) or "-"
        versions: dict[str, list[str]] = {}
        for entry in json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]"):
            name, version = entry["name"], str(entry["version"])
            if name not in aliases:
                try:
                    pointing = client.get_registered_model(name).aliases or {}
                except mlflow.exceptions.MlflowException:
                    pointing = {}
                aliases[name] = {}
                for alias, aliased in sorted(pointing.items()):
                    aliases[name].setdefault(str(aliased), []).append(alias)
            versions.setdefault(name, []).append(f"v{version}" + "".join(f"@{alias}" for alias in aliases[name].get(version, [])))
        registered = "; ".join(f"{name} {','.join(listed)}" for name, listed in sorted(versions.items())) or "-"
        rows.append((model.model_id, model.name, str(model.status), source, metrics, registered))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(["promoted generators (MLflow LoggedModels):", *lines])
