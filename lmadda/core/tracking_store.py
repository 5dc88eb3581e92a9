"""MLflow experiments whose artifacts live beside their SQLite store, shared by the sweep and the study.

A local store is a folder (`mlflow.db` + `mlartifacts/`) that users move, copy or mount elsewhere, but
MLflow records artifact locations as absolute `file:` URIs. Each experiment lmadda creates therefore
also records its artifact root relative to the store (`lmadda.artifact_root`), and every open of the
store re-points the recorded URIs there when the folder has moved (`relocate_artifacts`).
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from lmadda.core.errors import LmaddaError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ARTIFACT_ROOT_TAG = "lmadda.artifact_root"  # the experiment's artifact folder, relative to the SQLite file's folder
DEFAULT_ROOT = "mlartifacts"
FINISHED = RunStatus.to_string(RunStatus.FINISHED)


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///path` tracking URI (`sqlite:////abs/path` is absolute); None otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_location(tracking_uri: str, storage_path: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local SQLite store (MLflow's default is
    ./mlruns in whatever directory the driver runs in); a tracking server decides for itself."""
    if tracking_uri.startswith("sqlite:"):
        return (Path(storage_path) / DEFAULT_ROOT).resolve().as_uri()
    return None


TRACKING_ENV = "MLFLOW_TRACKING_URI"


def keeps_tracking_env(function: Callable) -> Callable:
    """Run `function` and put $MLFLOW_TRACKING_URI back as the caller had it.

    MLflow's fluent API (start_run, log_params) reads one process-wide tracking URI, and `mlflow.set_tracking_uri`
    also writes it into $MLFLOW_TRACKING_URI. A sweep config and the endpoint take that variable for the user's
    choice of store, so without this a promotion to one store would send a later sweep in the same process (a
    notebook, a test session) to it."""
    @functools.wraps(function)
    def restoring(*args, **kwargs):
        before = os.environ.get(TRACKING_ENV)
        try:
            return function(*args, **kwargs)
        finally:
            if before is None:
                os.environ.pop(TRACKING_ENV, None)
            else:
                os.environ[TRACKING_ENV] = before

    return restoring


def ensure_experiment(tracking_uri: str, name: str, storage_path: Path):
    """Open the store (re-pointing a moved one) and make `name` the active experiment, creating it with
    its artifacts in `storage_path/mlartifacts` and that folder recorded relative to the store."""
    mlflow.set_tracking_uri(tracking_uri)
    relocate_artifacts(tracking_uri)
    client = MlflowClient()
    if client.get_experiment_by_name(name) is None:
        location = artifact_location(tracking_uri, storage_path)
        database = sqlite_file(tracking_uri)
        tags = None
        if location is not None and database is not None:
            root = (Path(storage_path) / DEFAULT_ROOT).resolve()
            tags = {ARTIFACT_ROOT_TAG: os.path.relpath(root, database.resolve().parent)}
        client.create_experiment(name, artifact_location=location, tags=tags)
    return mlflow.set_experiment(name)


def relocate_artifacts(tracking_uri: str, log=print) -> list[tuple[str, str]]:
    """Re-point a moved or copied SQLite store at the artifacts beside it; return the (old, new) roots changed.

    An experiment is re-pointed when its recorded root differs from its root relative to the store:
    the `lmadda.artifact_root` tag, or, for stores made before the tag, `mlartifacts/` beside the
    store when that folder holds this experiment's runs. MLflow has no API to change an artifact
    location, so the SQLite rows are rewritten in one transaction (a prefix swap, nothing else).
    """
    database = sqlite_file(tracking_uri)
    if database is None or not database.is_file():
        return []
    store = database.resolve().parent
    with closing(sqlite3.connect(database, timeout=30)) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"experiments", "experiment_tags", "runs"} <= tables:
            return []  # a store MLflow has not initialised yet
        rows = connection.execute(
            "SELECT e.experiment_id, e.artifact_location, t.value FROM experiments e "
            "LEFT JOIN experiment_tags t ON t.experiment_id = e.experiment_id AND t.key = ?", (ARTIFACT_ROOT_TAG,)).fetchall()
        moves = []
        for experiment_id, recorded, relative in rows:
            if not recorded or not recorded.startswith("file:"):
                continue  # a remote root (s3:, mlflow-artifacts:) or MLflow's own ./mlruns default
            root = (store / (relative or DEFAULT_ROOT)).resolve()
            if recorded == root.as_uri():
                continue
            if relative is None and not _holds_runs(connection, experiment_id, root):
                continue
            moves.append((experiment_id, recorded, root.as_uri()))
        if not moves:
            return []
        try:
            with connection:  # one transaction: all or nothing
                for experiment_id, old, new in moves:
                    _swap_prefix(connection, tables, experiment_id, old, new)
        except sqlite3.OperationalError as error:
            old, new = moves[0][1:]
            raise LmaddaError(
                f"MLflow store {database} has moved: its artifacts are recorded at {old} but lie at {new}, and the "
                f"store cannot be updated ({error}). Make {database} writable and open it once (any lmadda sweep, "
                "runs or serve command re-points it), or put the folder back where it was") from error
    for _, old, new in moves:
        log(f"[mlflow] {database} was moved: artifact root {old} -> {new}")
    return [(old, new) for _, old, new in moves]


def _holds_runs(connection: sqlite3.Connection, experiment_id, root: Path) -> bool:
    runs = connection.execute("SELECT run_uuid FROM runs WHERE experiment_id = ?", (experiment_id,)).fetchall()
    return any((root / run_id).is_dir() for (run_id,) in runs)


def _swap_prefix(connection: sqlite3.Connection, tables: set[str], experiment_id, old: str, new: str) -> None:
    """Replace the root `old` by `new` at the start of every URI recorded under it (whole path parts only)."""
    def swap(table: str, column: str, scope: str = "", scope_args: tuple = ()) -> None:
        connection.execute(
            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
            f"WHERE ({column} = ? OR substr({column}, 1, ?) = ?){scope}",
            (new, len(old) + 1, old, len(old) + 1, old + "/", *scope_args))

    in_experiment = (" AND experiment_id = ?", (experiment_id,))
    swap("experiments", "artifact_location", *in_experiment)
    swap("runs", "artifact_uri", *in_experiment)
    if "logged_models" in tables:
        swap("logged_models", "artifact_location", *in_experiment)
    if "model_versions" in tables:  # versions registered from a path rather than runs:/ (which follows the run)
        swap("model_versions", "storage_location")
        swap("model_versions", "source")


def all_runs(client: MlflowClient, experiment_id: str) -> list:
    """Every active run of an experiment, page by page (one search returns at most 1000)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def delete_run(client: MlflowClient, run) -> None:
    """Delete a run and, for a local store, its artifact folder (MLflow keeps it until `mlflow gc`)."""
    client.delete_run(run.info.run_id)
    uri = run.info.artifact_uri or ""
    if uri.startswith("file:"):
        folder = Path(unquote(urlparse(uri).path))
        shutil.rmtree(folder.parent if folder.name == "artifacts" else folder, ignore_errors=True)


def one_finished_run_per_key(client: MlflowClient, runs: list, key_tag: str, log=print) -> dict[str, object]:
    """key -> its FINISHED run. A run killed or failed while it was being logged (RUNNING, FAILED,
    KILLED) is deleted so that the caller logs it again; a second finished run of a key is deleted too."""
    kept: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        key = run.data.tags.get(key_tag)
        if key is None:
            continue
        if run.info.status != FINISHED or key in kept:
            state = "a duplicate" if run.info.status == FINISHED else f"left {run.info.status} by an interrupted run"
            log(f"[mlflow] deleting run {run.info.run_id} of {key} ({state})")
            delete_run(client, run)
            continue
        kept[key] = run
    return kept
