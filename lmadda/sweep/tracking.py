"""MLflow: one experiment per sweep, one parent run per sweep, one nested run per trial, and the
model registry's aliases for the best generator per (marker, microscope setting).

Trial runs carry params (the trial's grid point and adaptation options), metrics (the g/d loss and D
accuracy curves by step, the final Pearson per marker when labels exist), tags (marker list, setting,
shift, layer, collapsed) and the adapted generator as an artifact in lmadda's own checkpoint format
(state dict + config, any image size; MLflow's default pt2 export would fix the input shape).
Promotion makes each chosen generator an MLflow LoggedModel (MLflow 3's model entity): the run it
came from is its source run, the file itself (lmadda's format, no MLflow flavour) is its artifact,
the trial's grid point its params, and the trial's results are logged linked to it (`model_id`).
Each registry version is created from it (source `models:/<model_id>`), so the UI shows the lineage
run -> LoggedModel -> version, and carries the file's SHA-256 as its `sha256` tag, which the
endpoint checks each download against, so a damaged or swapped file in the store is never served.
Versions registered before LoggedModels (source `runs:/...`) keep resolving and serving as they were.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (MLFLOW_GIT_REPO_URL, MLFLOW_MODEL_VERSIONS, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME,
                                     MLFLOW_SOURCE_NAME)

from lmadda.core.errors import LmaddaError
from lmadda.evaluation.metrics import is_finite
from lmadda.core.registry_names import SHA256_TAG, alias_for, file_sha256, logged_model_name, model_name
from lmadda.evaluation.rows import model_metrics, model_params
from lmadda.core.tracking_store import (FINISHED, all_runs, delete_run, ensure_experiment, keeps_tracking_env, one_finished_run_per_key,
                                   relocate_artifacts)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ARTIFACT_DIR = "generator"
MODEL_TYPE = "lmadda-generator"  # the LoggedModel's model_type: lmadda's own checkpoint file, not an MLflow flavour
SOURCE_ARTIFACT_TAG = "lmadda.source_artifact"  # a LoggedModel's tag: the run artifact its generator file was copied from
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


LABEL_FREE = "label_free"


def resolve_criterion(trial_metrics: list[dict[str, float]]) -> str:
    """`auto`: the labelled Pearson where any trial has it, else the label-free selector."""
    labelled = any(name.startswith("pearson_") and is_finite(value) for metrics in trial_metrics for name, value in metrics.items())
    return "pearson" if labelled else LABEL_FREE


@keeps_tracking_env
def promote(tracking_uri: str, experiment: str, *, criterion: str = "auto", sweep=None, replace: bool = False,
            log=print) -> list[dict]:
    """Register the best non-collapsed trial per (marker, target) and point alias <target> at it.

    `criterion` is `pearson` (the labelled Pearson of the marker, maximised; needs target labels),
    `label_free` (lmadda.selection.selector over the unadapted model, AdaBN, histogram matching and every trial,
    falling back to the unadapted model when nothing is confidently better; needs the sweep config
    `sweep` for the source model and the unlabelled target images), one per-trial criterion `lf_<name>`
    from `lmadda.selection.criteria` (minimised; for comparison), or `auto`: `pearson` where the trials have
    target labels, otherwise `label_free`. Each promoted generator becomes a READY LoggedModel
    (`log_generator_model`, one per file however many markers it wins) and each (marker, target) a
    registry version created from it, which records the criterion and its value or choice, and the
    SHA-256 of its generator file (`sha256`).

    The serving alias <target> moves only to a promotion by the criterion that set it (a re-run, a newer sweep), or
    with `replace`: a promotion by another criterion is registered under <target>--<criterion> beside it and says
    how to serve it (`served_alias`), so that a comparison run as a job never swaps the models a lab serves.
    """
    mlflow.set_tracking_uri(tracking_uri)
    relocate_artifacts(tracking_uri, log)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)  # never a registry resolved elsewhere
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
        return _promote_label_free(client, found.experiment_id, runs, sweep, replace=replace, log=log)
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
    promoted, generators = [], {}  # run id -> its LoggedModel: one per generator file, however many markers it wins
    for (marker, target), (_, value, run) in sorted(best.items()):
        if run.info.run_id not in generators:
            generators[run.info.run_id] = log_generator_model(client, run.info.run_id, target, params=run.data.params,
                                                              metrics=_final_metrics(run))
        entry = _register(client, marker, target, generators[run.info.run_id],
                          {"criterion": criterion, "criterion_value": f"{value:.6f}", "layer": run.data.tags.get("layer", "")},
                          replace=replace, log=log)
        promoted.append({**entry, criterion: value})
        shown = f"{criterion} {value:.4f}" if label_free else f"{criterion}_{marker} {value:.3f}"
        log(f"[promote] models:/{entry['model']}@{entry['alias']} -> version {entry['version']} (layer {run.data.tags.get('layer')}, {shown})")
    return promoted


@dataclass(frozen=True)
class PromotedGenerator:
    """A generator file held by a READY LoggedModel: the model the registry's versions are created from."""

    model_id: str
    run_id: str  # the run it came from (a trial, a label-free choice, or register_checkpoint's run)
    sha256: str  # of the LoggedModel's stored file, which every registered version serves


def _generator_path(client: MlflowClient, run_id: str) -> str:
    """The run-relative path of the run's one generator file (generator/<name>.pt)."""
    artifacts = client.list_artifacts(run_id, ARTIFACT_DIR)
    if not artifacts:
        raise LmaddaError(f"run {run_id} has no generator artifact to register")
    if artifacts[0].is_dir:
        raise LmaddaError(f"run {run_id}'s generator artifact {artifacts[0].path} is a folder; the endpoint serves one "
                          f"checkpoint file: log the generator .pt itself under {ARTIFACT_DIR}/")
    return artifacts[0].path


def _stored_sha256(client: MlflowClient, model_id: str) -> str:
    """The SHA-256 of a fresh download of the LoggedModel's generator file: the bytes the registry serves, which the
    endpoint checks every download of a version against (serve/registry.py)."""

    model = client.get_logged_model(model_id)
    with tempfile.TemporaryDirectory() as folder:
        mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=folder, tracking_uri=client.tracking_uri)
        found = sorted(Path(folder).rglob("*.pt"))
        if len(found) != 1:
            raise LmaddaError(f"LoggedModel {model_id} holds {len(found)} checkpoint files; expected one generator .pt")
        return file_sha256(found[0])


def _reusable(client: MlflowClient, run, path: str) -> PromotedGenerator | None:
    """A READY LoggedModel an earlier promotion made of this run's generator file, whose stored copy still has the
    digest it was made with (so promoting a sweep again adds versions, not copies of its generators)."""
    models = client.search_logged_models([run.info.experiment_id], filter_string=(
        f"source_run_id = '{run.info.run_id}' AND tags.`{SOURCE_ARTIFACT_TAG}` = '{path}'"))
    # READY is checked here, not in the filter: MLflow 3.17's SQL store compares `status = 'READY'` with its integer column.
    for model in sorted(models, key=lambda m: m.creation_timestamp or 0, reverse=True):
        if model.status == LoggedModelStatus.READY and model.tags.get(SHA256_TAG):
            try:
                if _stored_sha256(client, model.model_id) == model.tags[SHA256_TAG]:
                    return PromotedGenerator(model.model_id, run.info.run_id, model.tags[SHA256_TAG])
            except (LmaddaError, mlflow.exceptions.MlflowException, OSError):
                continue  # its stored file is gone or damaged: make a new one from the run's copy
    return None


def log_generator_model(client: MlflowClient, run_id: str, target: str, *, params: dict | None = None,
                        metrics: dict[str, float] | None = None) -> PromotedGenerator:
    """The run's generator file as an MLflow LoggedModel: created PENDING with the run as its source, the file (lmadda's
    own checkpoint format) copied into its artifacts, `metrics` logged to the run linked to it (`Metric.model_id`), its
    SHA-256 tagged, the run's outputs naming it, then finalized READY. A READY one an earlier promotion made of the same
    file is reused. `params`: what made the model (the trial's grid point, the label-free choice)."""
    run = client.get_run(run_id)
    path = _generator_path(client, run_id)
    reused = _reusable(client, run, path)
    if reused is not None:
        return reused
    model = client.create_logged_model(run.info.experiment_id, name=logged_model_name(target), source_run_id=run_id,
                                       tags={SOURCE_ARTIFACT_TAG: path, "target": target},
                                       params={k: str(v) for k, v in (params or {}).items()}, model_type=MODEL_TYPE)
    try:
        with tempfile.TemporaryDirectory() as folder:
            local = Path(client.download_artifacts(run_id, path, folder))
            upload = Path(folder) / "model"
            upload.mkdir()
            local.replace(upload / local.name)
            client.log_model_artifacts(model.model_id, str(upload))
        digest = _stored_sha256(client, model.model_id)
        client.set_logged_model_tags(model.model_id, {SHA256_TAG: digest})
        now = int(time.time() * 1000)
        linked = [Metric(k, float(v), now, 0, model_id=model.model_id) for k, v in sorted((metrics or {}).items()) if is_finite(v)]
        if linked:
            client.log_batch(run_id, metrics=linked)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        try:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)  # never left PENDING, never reused
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise
    return PromotedGenerator(model.model_id, run_id, digest)


def _final_metrics(run) -> dict[str, float]:
    """A trial's results (not its training curves): the Pearson per marker, the label-free criteria, collapse, steps."""
    return {k: v for k, v in run.data.metrics.items() if k.startswith(("pearson", "lf_")) or k in ("collapsed", "steps_done")}


@contextmanager
def _tracking_uri_of(client: MlflowClient):
    """MLflow's SQL registry looks a `models:/<model_id>` source up through the global tracking URI, not the client's
    (a TODO in mlflow/store/model_registry/sqlalchemy_store.py): point it at the client's store meanwhile."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def served_alias(client: MlflowClient, name: str, alias: str, criterion: str | None, replace: bool) -> str:
    """The alias a promotion by `criterion` may point: the serving alias itself when it is free, held by a promotion by
    the same criterion, or `replace` is given (a registration outside a promotion has no criterion and always serves);
    otherwise <alias>--<criterion>, beside the one the endpoint serves."""
    if replace or criterion is None:
        return alias
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:  # no version holds it yet
        return alias
    held_by = holder.tags.get("criterion")
    return alias if held_by in (None, criterion) else f"{alias}--{criterion}"


def _register(client: MlflowClient, marker: str, target: str, generator: PromotedGenerator, tags: dict, *,
              replace: bool = True, log=print) -> dict:
    """Register the LoggedModel `generator` as a new version of lmadda-<marker> (source `models:/<model_id>`, tagged
    with its file's SHA-256), record the version on the LoggedModel (`mlflow.modelVersions`, as `mlflow.register_model`
    does) and point alias <target> at it, or <target>--<criterion> where another criterion's promotion serves
    <target> and `replace` is not given (`served_alias`)."""
    name = model_name(marker)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=f"lmadda generators predicting {marker}; aliases name microscope settings")
    # The digest is a tag of the version from its creation, so no replica can follow the alias to an unverifiable version.
    with _tracking_uri_of(client):
        version = client.create_model_version(name, f"models:/{generator.model_id}", run_id=generator.run_id, model_id=generator.model_id,
                                              tags={"target": target, "marker": marker, **tags, SHA256_TAG: generator.sha256})
    listed = json.loads(client.get_logged_model(generator.model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    client.set_logged_model_tags(generator.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed + [{"name": name, "version": version.version}])})
    serving = alias_for(target)
    alias = served_alias(client, name, serving, tags.get("criterion"), replace)
    if alias != serving:
        holder = client.get_model_version_by_alias(name, serving)
        log(f"[promote] models:/{name}@{serving} stays at version {holder.version} (promoted by {holder.tags.get('criterion')}); "
            f"this {tags.get('criterion')} promotion is at @{alias}. To serve it: promote again with --replace")
    client.set_registered_model_alias(name, alias, version.version)
    return {"model": name, "alias": alias, "version": version.version, "run_id": generator.run_id, "model_id": generator.model_id,
            "serving": alias == serving}


@keeps_tracking_env
def register_checkpoint(tracking_uri: str, checkpoint_path: str | Path, marker: str, setting: str, *,
                        experiment: str = "lmadda-models") -> dict:
    """Log one checkpoint file as a run's generator and register it as a LoggedModel, tagged with its SHA-256, under
    alias `setting` of lmadda-<marker>: a model made outside a sweep (or a test's or a benchmark's) ready to serve."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(tags=SOURCE_TAGS) as run:
        mlflow.log_artifact(str(checkpoint_path), artifact_path=ARTIFACT_DIR)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    generator = log_generator_model(client, run.info.run_id, setting, params={"checkpoint": Path(checkpoint_path).name})
    return _register(client, marker, setting, generator, {})


def _promote_label_free(client: MlflowClient, experiment_id: str, runs: list, sweep, replace: bool = False, log=print) -> list[dict]:
    from lmadda.sweep.label_free_promotion import choose_per_target, log_choice_checkpoint

    if sweep is None:
        raise LmaddaError("the label-free choice needs the sweep config (--config): it scores the unadapted model, the cheap "
                          "corrections and every trial on the sweep's unlabelled target images")
    promoted = []
    for target, chosen in choose_per_target(client, runs, sweep, ARTIFACT_DIR, log).items():
        choice, trial = chosen["choice"], chosen["run"]
        run_id = log_choice_checkpoint(client, experiment_id, target, chosen["checkpoint"], ARTIFACT_DIR)
        tags = {"criterion": LABEL_FREE, "chosen": choice.chosen, "fell_back": str(choice.fell_back).lower(),
                "reason": choice.reason[:5000], "trial_run": trial.info.run_id if trial is not None else ""}
        metrics = {"fell_back": float(choice.fell_back)}
        if is_finite(choice.means.get(choice.chosen)):
            metrics[f"selector_{choice.score}"] = float(choice.means[choice.chosen])  # the chosen model's mean score
        if is_finite(choice.win_fraction.get(choice.chosen)):
            metrics["selector_win_fraction"] = float(choice.win_fraction[choice.chosen])
        generator = log_generator_model(client, run_id, target, metrics=metrics,  # one checkpoint for every marker
                                        params={k: tags[k] for k in ("criterion", "chosen", "fell_back", "trial_run")})
        for marker in chosen["checkpoint"].markers:
            entry = _register(client, marker, target, generator, tags, replace=replace, log=log)
            promoted.append({**entry, "chosen": choice.chosen, "fell_back": choice.fell_back})
            log(f"[promote] models:/{entry['model']}@{entry['alias']} -> version {entry['version']} ({choice.chosen})")
    return promoted


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
