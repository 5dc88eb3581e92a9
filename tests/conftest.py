"""Shared fixtures: a tiny simulated data set (made once per session) and the real sephaCe set."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

def _unused_port() -> int:
    """A loopback port nothing listens on now (bound, then released for the server the test starts next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """`free_port()`: a loopback port nothing listens on now, for a server a test starts (any fixture scope)."""
    return _unused_port


# The real set lives in ../shared beside the project; LMADDA_SEPHACE_DIR points elsewhere.
SEPHACE_DIR = Path(os.environ.get("LMADDA_SEPHACE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "sephace"))
COLICOORDS_DIR = Path(os.environ.get("LMADDA_COLICOORDS_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "colicoords"))


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """12 simulated fields of 64x64 (train/val/test all non-empty)."""
    from lmadda.data.synth import SynthConfig, synthesize

    manifest, _ = synthesize(tmp_path_factory.mktemp("synth"), SynthConfig(fields=12, size=64, seed=3))
    return manifest


@pytest.fixture(scope="session")
def sephace_dir() -> Path:
    if not (SEPHACE_DIR / "tif").is_dir():
        pytest.skip(f"real sephaCe data not found at {SEPHACE_DIR} (expected in ../shared/data/sephace beside the project, or set LMADDA_SEPHACE_DIR)")
    return SEPHACE_DIR


@pytest.fixture(scope="session")
def colicoords_dir() -> Path:
    if not all((COLICOORDS_DIR / name / "brightfield").is_dir() for name in ("ds1", "ds2", "ds4")):
        pytest.skip(f"real ColiCoords data not found at {COLICOORDS_DIR} (expected in ../shared/data/colicoords beside the project, "
                    "or set LMADDA_COLICOORDS_DIR)")
    return COLICOORDS_DIR


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (start-up costs seconds on 2 cores)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)  # dashboard on: lmadda_tune.sweep.LOCAL_RAY_NOTE
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_source(tiny_synth, tmp_path_factory):
    """A 2-step source model on the tiny simulated set (depth 6, 64x64): fast, not good."""
    from lmadda.training.source import SourceTrainConfig, train_source

    path = tmp_path_factory.mktemp("tiny_source") / "source.pt"
    config = SourceTrainConfig(manifest=tiny_synth.source, markers=["dapi", "cd29"], ngf=4, depth=6, ndf=4, crop_size=64,
                               batch_size=2, epochs=1, crops_per_epoch=4, device="cpu")
    train_source(config, path, progress=False)
    return path


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store: creating its tables takes seconds, copying it none."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def private_user_dirs(monkeypatch, tmp_path_factory):
    """Per-user files lmadda keeps (the endpoint's token and model cache) go to a test folder, never the home."""
    root = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
