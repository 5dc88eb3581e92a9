"""Shared fixtures: a tiny simulated data set (made once per session) and the real sephaCe set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# The real set lives in ../shared beside the project; LMADDA_SEPHACE_DIR points elsewhere.
SEPHACE_DIR = Path(os.environ.get("LMADDA_SEPHACE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "sephace"))


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
