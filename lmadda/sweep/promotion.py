"""Promotion: the chosen generator per (marker, microscope setting) into the MLflow model registry, by the labelled
Pearson or by the label-free selector (`lmadda.sweep.label_free_promotion`).

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
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from lmadda.core.errors import LmaddaError
from lmadda.core.registry_names import SHA256_TAG, alias_for, file_sha256, logged_model_name, model_name
from lmadda.core.tracking_store import keeps_tracking_env, relocate_artifacts
from lmadda.evaluation.metrics import is_finite
from lmadda.sweep.tracking import ARTIFACT_DIR, SOURCE_TAGS

SOURCE_ARTIFACT_TAG = "lmadda.source_artifact"  # a LoggedModel's tag: the run artifact its generator file was copied from
MODEL_TYPE = "lmadda-generator"  # the LoggedModel's model_type: lmadda's own checkpoint file, not an MLflow flavour
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
