"""MLflow: one experiment per sweep, one parent run per sweep, one nested run per trial, and the
model registry's aliases for the best generator per (marker, microscope setting).

Trial runs carry params (the trial's grid point and adaptation options), metrics (the g/d loss and D
accuracy curves by step, the final Pearson per marker when labels exist), tags (marker list, setting,
shift, layer, collapsed) and the adapted generator as an artifact in lmadda's own checkpoint format
(state dict + config, any image size; MLflow's default pt2 export would fix the input shape).
A promoted model version carries the generator file's SHA-256 as its `sha256` tag, which the
endpoint checks each download against, so a damaged or swapped file in the store is never served.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from lmadda.errors import LmaddaError
from lmadda.tracking_store import FINISHED, all_runs, delete_run, ensure_experiment, one_finished_run_per_key, relocate_artifacts

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ARTIFACT_DIR = "generator"


def alias_for(target: str) -> str:
    """Registry aliases allow letters, digits, '_' and '-': bright_field, phase_contrast-overexposure-2_5."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", target.replace(".", "_")).replace("+", "-")


def model_name(marker: str) -> str:
    return f"lmadda-{marker}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def log_sweep(sweep, rows: list[dict], results_path: Path, log=print, *, unadapted: dict | None = None,
              report_files: list[Path] = ()) -> str:
    """Log every trial as a nested run; return the parent run id. A resumed sweep logs only new trials.

    Runs are created with their tags, and a trial counts as logged only once its run has FINISHED:
    a run a killed driver left behind (RUNNING, or untagged from before tags were set at creation) is
    deleted here and its trial logged again, so any kill and resume ends with one finished run per trial.
    """
    experiment = ensure_experiment(sweep.tracking_uri, sweep.experiment, sweep.storage_path)
    client = MlflowClient()
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
    sweep_tags = {"lmadda.kind": "sweep", "lmadda.sweep": sweep.name}
    with mlflow.start_run(run_id=parent_id) if parent_id else mlflow.start_run(run_name=sweep.name, tags=sweep_tags) as parent:
        if not parent_id:
            mlflow.log_params({"sweep": sweep.name, "source_checkpoint": str(sweep.source.checkpoint), "manifest": str(sweep.data.manifest),
                               "source_setting": sweep.data.source_setting, "target_setting": sweep.data.target_setting,
                               "shift": sweep.data.shift or "none", "trials": len(rows)})
        for row in rows:
            key = f"{sweep.name}/{row['target']}/L{row['layer']}/lr{row['lr']:g}/s{row['seed']}"
            if key in logged or not row.get("_history"):
                continue  # already logged by an earlier run of this sweep, or never started
            tags = {"lmadda.kind": "trial", "lmadda.trial_key": key, "lmadda.sweep": sweep.name, "setting": row["setting"], "shift": row["shift"],
                    "target": row["target"], "layer": str(row["layer"]), "collapsed": str(row["collapsed"]).lower(),
                    "collapse_reason": row["collapse_reason"], "markers": ",".join(k[8:] for k in row if k.startswith("pearson_"))}
            with mlflow.start_run(run_name=f"{row['target']}-L{row['layer']}-lr{row['lr']:g}-s{row['seed']}", nested=True, tags=tags):
                mlflow.log_params({"layer": row["layer"], "lr": row["lr"], "seed": row["seed"], "target": row["target"],
                                   "magnitude": row["magnitude"], **{f"adapt.{k}": v for k, v in sweep.adapt.items()}})
                for record in row.get("_history", []):
                    step = int(record.get("step", 0) or 0)
                    metrics = {k: float(record[k]) for k in ("g_loss", "d_loss", "d_acc", "d_running_acc", "g_updates") if _finite(record.get(k))}
                    mlflow.log_metrics(metrics, step=step)
                final = {k: float(v) for k, v in row.items() if k.startswith(("pearson", "lf_")) and _finite(v)}
                final["collapsed"] = float(row["collapsed"])
                final["steps_done"] = float(row["steps_done"])
                mlflow.log_metrics(final)
                if row.get("generator_path") and Path(row["generator_path"]).exists():
                    mlflow.log_artifact(row["generator_path"], artifact_path=ARTIFACT_DIR)
        mlflow.log_artifact(str(results_path))
        for path in report_files:  # per-layer figures, best.parquet, the learning-rate selection
            mlflow.log_artifact(str(path), artifact_path="report" + (f"/{path.parent.name}" if path.parent.name.startswith("lr_") else ""))
        for target, metrics in (unadapted or {}).items():
            mlflow.log_metrics({f"unadapted.{alias_for(target)}.{k}": float(v) for k, v in metrics.items() if _finite(v)})
        log(f"[sweep] MLflow: experiment {sweep.experiment!r} at {sweep.tracking_uri}, parent run {parent.info.run_id}")
        return parent.info.run_id


LABEL_FREE = "label_free"


def resolve_criterion(trial_metrics: list[dict[str, float]]) -> str:
    """`auto`: the labelled Pearson where any trial has it, else the label-free selector."""
    labelled = any(name.startswith("pearson_") and _finite(value) for metrics in trial_metrics for name, value in metrics.items())
    return "pearson" if labelled else LABEL_FREE


def promote(tracking_uri: str, experiment: str, *, criterion: str = "auto", sweep=None, log=print) -> list[dict]:
    """Register the best non-collapsed trial per (marker, target) and point alias <target> at it.

    `criterion` is `pearson` (the labelled Pearson of the marker, maximised; needs target labels),
    `label_free` (lmadda.selector over the unadapted model, AdaBN, histogram matching and every trial,
    falling back to the unadapted model when nothing is confidently better; needs the sweep config
    `sweep` for the source model and the unlabelled target images), one per-trial criterion `lf_<name>`
    from `lmadda.selection` (minimised; for comparison), or `auto`: `pearson` where the trials have
    target labels, otherwise `label_free`. Every version records the criterion and its value or choice,
    and the SHA-256 of its generator file (`sha256`).
    """
    mlflow.set_tracking_uri(tracking_uri)
    relocate_artifacts(tracking_uri, log)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LmaddaError(f"no MLflow experiment {experiment!r} at {tracking_uri}; run a sweep first")
    # FINISHED only: a trial run an interrupted sweep left RUNNING may lack its generator (`sweep run --reuse` deletes it).
    runs = client.search_runs([found.experiment_id], "tags.`lmadda.kind` = 'trial' and tags.collapsed = 'false' and attributes.status = 'FINISHED'",
                              max_results=5000)
    if criterion == "auto":
        criterion = resolve_criterion([run.data.metrics for run in runs])
        log(f"[promote] criterion: {criterion} ({'target labels found' if criterion == 'pearson' else 'no target labels: the label-free selector'})")
    if criterion == LABEL_FREE:
        return _promote_label_free(client, found.experiment_id, runs, sweep, log)
    label_free = criterion.startswith("lf_")  # one value per model, lower is better
    best: dict[tuple[str, str], tuple[float, float, object]] = {}  # (score: higher is better, value, run)
    for run in runs:
        for marker in run.data.tags.get("markers", "").split(","):
            value = run.data.metrics.get(criterion if label_free else f"{criterion}_{marker}")
            if not marker or value is None or not math.isfinite(value):
                continue
            score = -value if label_free else value
            key = (marker, run.data.tags["target"])
            if key not in best or score > best[key][0]:
                best[key] = (score, value, run)
    if not best:
        raise LmaddaError(f"experiment {experiment!r} has no non-collapsed trial with a {criterion} metric; "
                          + ("target labels are needed for the labelled criterion; promote with a label-free one, e.g. --criterion lf_output_w1"
                             if criterion == "pearson" else "the trials predate label-free criteria: re-run the sweep"))
    promoted = []
    for (marker, target), (_, value, run) in sorted(best.items()):
        entry = _register(client, marker, target, run.info.run_id,
                          {"criterion": criterion, "criterion_value": f"{value:.6f}", "layer": run.data.tags.get("layer", "")})
        promoted.append({**entry, criterion: value})
        shown = f"{criterion} {value:.4f}" if label_free else f"{criterion}_{marker} {value:.3f}"
        log(f"[promote] models:/{entry['model']}@{entry['alias']} -> version {entry['version']} (layer {run.data.tags.get('layer')}, {shown})")
    return promoted


def generator_artifact(client: MlflowClient, run_id: str) -> tuple[str, str]:
    """(artifact path, SHA-256) of the run's generator file. The digest is taken of a fresh download of
    the stored copy, not of the file the sweep wrote: it must describe the bytes the registry serves,
    which the endpoint checks every download of the version against (serve/registry.py)."""
    from serve.registry import file_sha256  # lazily: it imports torch, which a sweep's logging step does not need

    artifacts = client.list_artifacts(run_id, ARTIFACT_DIR)
    if not artifacts:
        raise LmaddaError(f"run {run_id} has no generator artifact to register")
    if artifacts[0].is_dir:
        raise LmaddaError(f"run {run_id}'s generator artifact {artifacts[0].path} is a folder; the endpoint serves one "
                          f"checkpoint file: log the generator .pt itself under {ARTIFACT_DIR}/")
    with tempfile.TemporaryDirectory() as folder:
        return artifacts[0].path, file_sha256(Path(client.download_artifacts(run_id, artifacts[0].path, folder)))


def _register(client: MlflowClient, marker: str, target: str, run_id: str, tags: dict,
              artifact: tuple[str, str] | None = None) -> dict:
    """Register the run's generator as a new version of lmadda-<marker>, tagged with its SHA-256, and
    point alias <target> at it. `artifact` is `generator_artifact(client, run_id)` when already known."""
    from serve.registry import SHA256_TAG

    name = model_name(marker)
    path, digest = artifact or generator_artifact(client, run_id)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=f"lmadda generators predicting {marker}; aliases name microscope settings")
    # The digest is a tag of the version from its creation, so no replica can follow the alias to an unverifiable version.
    version = client.create_model_version(name, f"runs:/{run_id}/{path}", run_id=run_id,
                                          tags={"target": target, "marker": marker, **tags, SHA256_TAG: digest})
    alias = alias_for(target)
    client.set_registered_model_alias(name, alias, version.version)
    return {"model": name, "alias": alias, "version": version.version, "run_id": run_id}


def register_checkpoint(tracking_uri: str, checkpoint_path: str | Path, marker: str, setting: str, *,
                        experiment: str = "lmadda-models") -> dict:
    """Log one checkpoint file as a run's generator and register it, tagged with its SHA-256, under alias
    `setting` of lmadda-<marker>: a model made outside a sweep (or a test's or a benchmark's) ready to serve."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(checkpoint_path), artifact_path=ARTIFACT_DIR)
    return _register(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), marker, setting, run.info.run_id, {})


def _promote_label_free(client: MlflowClient, experiment_id: str, runs: list, sweep, log) -> list[dict]:
    from tune.label_free_promotion import choose_per_target, log_choice_checkpoint

    if sweep is None:
        raise LmaddaError("the label-free choice needs the sweep config (--config): it scores the unadapted model, the cheap "
                          "corrections and every trial on the sweep's unlabelled target images")
    promoted = []
    for target, chosen in choose_per_target(client, runs, sweep, ARTIFACT_DIR, log).items():
        choice, trial = chosen["choice"], chosen["run"]
        run_id = log_choice_checkpoint(client, experiment_id, target, chosen["checkpoint"], ARTIFACT_DIR)
        artifact = generator_artifact(client, run_id)  # one checkpoint for every marker: hashed once
        tags = {"criterion": LABEL_FREE, "chosen": choice.chosen, "fell_back": str(choice.fell_back).lower(),
                "reason": choice.reason[:5000], "trial_run": trial.info.run_id if trial is not None else ""}
        for marker in chosen["checkpoint"].markers:
            entry = _register(client, marker, target, run_id, tags, artifact)
            promoted.append({**entry, "chosen": choice.chosen, "fell_back": choice.fell_back})
            log(f"[promote] models:/{entry['model']}@{entry['alias']} -> version {entry['version']} ({choice.chosen})")
    return promoted


def compare_runs(tracking_uri: str, experiment: str) -> str:
    """The comparison table of an experiment's trial runs, from `mlflow.search_runs`."""
    mlflow.set_tracking_uri(tracking_uri)
    relocate_artifacts(tracking_uri)
    frame = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.`lmadda.kind` = 'trial'")
    if frame.empty:
        raise LmaddaError(f"no trial runs in MLflow experiment {experiment!r} at {tracking_uri}")
    pearson_columns = sorted(c for c in frame.columns if c.startswith("metrics.pearson_"))
    lines = [f"{'target':34s} {'layer':>5} {'lr':>9} {'collapsed':>9}" + "".join(f" {c[len('metrics.'):]:>13}" for c in pearson_columns)]
    frame = frame.sort_values(["tags.target", "params.lr", "params.layer"], key=lambda s: s.map(lambda v: (len(str(v)), str(v))))
    for _, run in frame.iterrows():
        cells = "".join(f" {run[c]:13.3f}" if isinstance(run[c], float) and math.isfinite(run[c]) else f" {'':>13}" for c in pearson_columns)
        lines.append(f"{run['tags.target']:34s} {run['params.layer']:>5} {float(run['params.lr']):>9.2g} {run['tags.collapsed']:>9}{cells}")
    return "\n".join(lines)
