"""Local MLflow stores (`mlflow.db` + `mlartifacts/`): movable, copyable, and whole after an interrupted study."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest



def _uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def registered(tmp_path, migrated_store, tiny_source) -> Path:
    """demo-out/sweeps in small: a store with one run holding a generator, registered as lmadda-dapi@bright_field."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from lmadda.core.tracking_store import ensure_experiment

    store = tmp_path / "demo-out" / "sweeps"
    store.mkdir(parents=True)
    shutil.copy(migrated_store, store / "mlflow.db")
    ensure_experiment(_uri(store), "lmadda-quick", store)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tiny_source), artifact_path="generator")
    client = MlflowClient(_uri(store))
    client.create_registered_model("lmadda-dapi")
    version = client.create_model_version("lmadda-dapi", f"runs:/{run.info.run_id}/generator", run_id=run.info.run_id)
    client.set_registered_model_alias("lmadda-dapi", "bright_field", version.version)
    return store


def _serve_loads(store: Path, cache: Path):
    from lmadda_serve.registry import StainModels

    models = StainModels(_uri(store), cache)
    ref = models.resolve("dapi", "bright_field")
    return models.load(ref.model_id)


def test_a_moved_store_serves_its_registered_models_from_the_new_place(registered, tmp_path):
    moved = tmp_path / "elsewhere" / "demo-out"
    moved.parent.mkdir()
    shutil.move(str(registered.parent), moved)
    checkpoint = _serve_loads(moved / "sweeps", tmp_path / "cache")
    assert checkpoint.markers == ["dapi", "cd29"]


def test_a_copied_store_uses_its_own_artifacts_not_the_originals(registered, tmp_path):
    from mlflow.tracking import MlflowClient

    from lmadda.core.tracking_store import relocate_artifacts

    copy = tmp_path / "copy"
    shutil.copytree(registered, copy)
    moves = relocate_artifacts(_uri(copy), log=lambda *_: None)
    assert moves == [((registered / "mlartifacts").resolve().as_uri(), (copy / "mlartifacts").resolve().as_uri())]
    client = MlflowClient(_uri(copy))
    (run,) = client.search_runs([client.get_experiment_by_name("lmadda-quick").experiment_id])
    assert run.info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri() + "/")
    assert relocate_artifacts(_uri(copy)) == []  # once re-pointed, opening again changes nothing
    shutil.rmtree(registered)  # the original gone, the copy still serves
    assert _serve_loads(copy, tmp_path / "cache").markers == ["dapi", "cd29"]


def test_a_moved_read_only_store_is_explained_not_left_pointing_nowhere(registered, tmp_path, monkeypatch):
    import lmadda.core.tracking_store as tracking_store
    from lmadda.core.errors import LmaddaError

    moved = tmp_path / "moved"
    shutil.move(str(registered), moved)
    # a read-only mount (file permissions would not stop root, who runs these tests in containers)
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda path, **kwargs: connect(f"file:{path}?mode=ro", uri=True, **kwargs))
    with pytest.raises(LmaddaError, match=r"mlflow.db has moved: its artifacts are recorded at file://.* but lie at file://.*Make .* writable"):
        tracking_store.relocate_artifacts(_uri(moved))


def test_a_study_model_left_running_by_a_kill_is_logged_again(tmp_path, migrated_store):
    from mlflow.tracking import MlflowClient

    from lmadda.study.tracking import StudyTracker, model_key

    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    row = {"target": "bright_field", "setting": "bright_field", "shift": "none", "magnitude": float("nan"), "method": "lmadda",
           "layer": 3, "matched": "3", "lr": 1e-4, "seed": 0, "marker": "dapi", "pearson": 0.5, "collapsed": False}
    tracker = StudyTracker(_uri(tmp_path), "study", tmp_path)
    # what a kill between creating the run and ending it leaves: the run, RUNNING, without its metrics
    client = MlflowClient(_uri(tmp_path))
    client.create_run(tracker.experiment.experiment_id, tags={"lmadda.kind": "model", "lmadda.key": model_key(row)})
    resumed = StudyTracker(_uri(tmp_path), "study", tmp_path)
    assert not resumed.has(model_key(row))
    assert resumed.sync([row]) == 1
    runs = client.search_runs([tracker.experiment.experiment_id])
    assert [(r.info.status, r.data.metrics.get("pearson")) for r in runs] == [("FINISHED", 0.5)]


def test_the_relative_artifact_root_is_recorded_when_the_experiment_is_made(tmp_path, migrated_store):
    from lmadda.core.tracking_store import ARTIFACT_ROOT_TAG, ensure_experiment

    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    experiment = ensure_experiment(_uri(tmp_path), "e", tmp_path / "runs")
    assert experiment.tags[ARTIFACT_ROOT_TAG] == "runs/mlartifacts"
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        (location,) = connection.execute("SELECT artifact_location FROM experiments WHERE name = 'e'").fetchone()
    assert location == (tmp_path / "runs" / "mlartifacts").resolve().as_uri()


def test_a_study_tracker_leaves_the_users_tracking_uri_as_it_was(tmp_path, migrated_store, monkeypatch):
    """mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI: a study must not send a later sweep to its own store."""
    import os

    from lmadda.study.tracking import StudyTracker

    first, second = tmp_path / "first", tmp_path / "second"
    for store in (first, second):  # two stores: MLflow writes the variable only when its global URI changes
        store.mkdir()
        shutil.copy(migrated_store, store / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    StudyTracker(_uri(first), "study", first)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    StudyTracker(_uri(second), "study", second)
    assert "MLFLOW_TRACKING_URI" not in os.environ
