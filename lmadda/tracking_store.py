"""MLflow experiments whose artifacts live beside their SQLite store, shared by the sweep and the study."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def artifact_location(tracking_uri: str, storage_path: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local SQLite store (MLflow's default is
    ./mlruns in whatever directory the driver runs in); a tracking server decides for itself."""
    if tracking_uri.startswith("sqlite:"):
        return (Path(storage_path) / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(tracking_uri: str, name: str, storage_path: Path):
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifact_location(tracking_uri, storage_path))
    return mlflow.set_experiment(name)
