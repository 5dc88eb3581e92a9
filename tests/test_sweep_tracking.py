"""A sweep's MLflow runs after any kill and resume: exactly one FINISHED run per trial, no orphans.

The sweep's trials are fake rows (no Ray): what is under test is `lmadda.sweep.tracking.log_sweep`, the step
that turns a finished grid into MLflow runs, and that a killed driver re-runs on `--resume`/`--reuse`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest



@pytest.fixture
def root(tmp_path, migrated_store) -> Path:
    (tmp_path / "sweeps").mkdir()
    shutil.copy(migrated_store, tmp_path / "sweeps" / "mlflow.db")
    return tmp_path


def fake_sweep(root: Path) -> SimpleNamespace:
    """What `log_sweep` reads of a SweepConfig (no torch import: the killed child starts in a second)."""
    storage = root / "sweeps"
    return SimpleNamespace(
        name="killed", storage_path=storage, tracking_uri=f"sqlite:///{storage / 'mlflow.db'}", experiment="lmadda-killed",
        source=SimpleNamespace(checkpoint=root / "source.pt"), adapt={"steps": 4},
        data=SimpleNamespace(manifest=root / "manifest.parquet", source_setting="phase_contrast"),
        grid=SimpleNamespace(targets=["phase_contrast+overexposure:2"]))


def fake_rows(root: Path) -> list[dict]:
    """Two finished trials, each with a short curve, a Pearson and a generator file."""
    rows = []
    for layer in (1, 11):
        generator = root / f"trial{layer}" / "generator.pt"
        generator.parent.mkdir(parents=True, exist_ok=True)
        generator.write_bytes(b"weights")
        rows.append({"point": f"L{layer}", "target": "phase_contrast+overexposure:2", "setting": "phase_contrast", "shift": "overexposure",
                     "magnitude": 2.0, "method": "lmadda", "layer": layer, "matched": str(layer), "lr": 1e-4, "seed": 0, "steps_done": 4, "collapsed": False, "collapse_reason": "",
                     "generator_path": str(generator), "pearson_dapi": 0.5,
                     "_history": [{"step": 2, "g_loss": 1.0, "d_loss": 0.7, "d_acc": 0.5}, {"step": 4, "g_loss": 0.9, "d_loss": 0.6, "d_acc": 0.6}]})
    (root / "results.parquet").write_bytes(b"table")
    return rows


def log(root: Path) -> str:
    from lmadda.sweep.tracking import log_sweep

    return log_sweep(fake_sweep(root), fake_rows(root), [root / "results.parquet"], log=lambda *_: None)


# Run in a child process that dies like SIGKILL (no `finally`, no atexit) right after the
# `count`-th call of `mlflow.<function>` returns.
KILLED_DRIVER = """
import os, sys
from pathlib import Path
import mlflow
sys.path.insert(0, {tests!r})
from test_sweep_tracking import log
function, count = {function!r}, {count}
original, calls = getattr(mlflow, function), []
def dying(*args, **kwargs):
    result = original(*args, **kwargs)
    calls.append(1)
    if len(calls) == count:
        os._exit(9)
    return result
setattr(mlflow, function, dying)
log(Path({root!r}))
"""


def _store(root: Path):
    from mlflow.tracking import MlflowClient

    from lmadda.sweep.tracking import log_sweep  # noqa: F401  (sets MLFLOW_DISABLE_TELEMETRY before the client)

    sweep = fake_sweep(root)
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.experiment)
    return client, client.search_runs([experiment.experiment_id], max_results=100)


def _assert_one_finished_run_per_trial(root: Path) -> None:
    client, runs = _store(root)
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status, r.data.tags.get("lmadda.kind")) for r in runs]
    trials = [r for r in runs if r.data.tags.get("lmadda.kind") == "trial"]
    assert sorted(r.data.tags["lmadda.trial_key"] for r in trials) == [
        "killed/L1", "killed/L11"]
    assert len(runs) == 3  # the two trials and their sweep run, nothing else
    for trial in trials:
        assert [a.path for a in client.list_artifacts(trial.info.run_id, "generator")] == ["generator/generator.pt"]
        assert trial.data.metrics["pearson_dapi"] == 0.5
    # no artifact folder of a deleted run is left beside the store
    folders = {p.name for p in (root / "sweeps" / "mlartifacts").iterdir()}
    assert folders <= {r.info.run_id for r in runs}


@pytest.mark.slow
@pytest.mark.parametrize("function, count", [
    ("start_run", 1),      # the sweep run created, nothing else
    ("start_run", 2),      # the first trial's run created, nothing logged in it
    ("log_artifact", 1),   # the first trial's generator logged, its run not ended
    ("log_metrics", 5),    # in the second trial's curve
], ids=lambda value: str(value))
def test_a_sweep_killed_while_logging_resumes_to_one_finished_run_per_trial(root, function, count):
    script = KILLED_DRIVER.format(tests=str(Path(__file__).parent), function=function, count=count, root=str(root))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert killed.returncode == 9, killed.stderr
    log(root)  # the resume
    _assert_one_finished_run_per_trial(root)
    log(root)  # and a second resume changes nothing
    _assert_one_finished_run_per_trial(root)


def test_an_untagged_running_orphan_from_an_older_kill_is_deleted_on_resume(root):
    """The store the issue found: a RUNNING run without tags, named like a finished trial, under the sweep run."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    parent_id = log(root)
    client, runs = _store(root)
    finished = next(r for r in runs if r.data.tags.get("lmadda.kind") == "trial")
    orphan = client.create_run(finished.info.experiment_id, run_name=finished.info.run_name, tags={MLFLOW_PARENT_RUN_ID: parent_id})
    (root / "sweeps" / "mlartifacts" / orphan.info.run_id / "artifacts").mkdir(parents=True)  # its empty folder
    log(root)
    _assert_one_finished_run_per_trial(root)


def test_promote_reads_finished_trials_only(root):
    """A trial run left RUNNING (no generator yet) is never registered."""
    from lmadda.sweep.promotion import promote

    log(root)
    client, runs = _store(root)
    trial = next(r for r in runs if r.data.tags.get("lmadda.kind") == "trial")
    client.update_run(trial.info.run_id, "RUNNING")
    sweep = fake_sweep(root)
    promoted = promote(sweep.tracking_uri, sweep.experiment, criterion="pearson", log=lambda *_: None)
    assert [p["run_id"] for p in promoted] != [trial.info.run_id] and len(promoted) == 1


def test_a_promoted_version_carries_the_sha256_of_its_stored_generator(root):
    """The endpoint checks every download of a version against its `sha256` tag (serve/registry.py)."""
    import hashlib

    from lmadda.sweep.promotion import promote

    log(root)
    sweep = fake_sweep(root)
    promoted = promote(sweep.tracking_uri, sweep.experiment, criterion="pearson", log=lambda *_: None)
    client, _ = _store(root)
    tags = client.get_model_version(promoted[0]["model"], promoted[0]["version"]).tags
    assert tags["sha256"] == hashlib.sha256(b"weights").hexdigest()  # fake_rows' generator file


def test_a_label_free_promotion_tags_every_markers_version_with_the_choice_checkpoints_sha256(root, monkeypatch):
    """The label-free path registers a checkpoint made for the choice, once per marker: each version gets its digest."""
    import torch

    import lmadda.sweep.label_free_promotion as label_free
    from lmadda.checkpoint import GeneratorCheckpoint
    from lmadda.models import GeneratorConfig, UNetGenerator
    from lmadda.selection.selector import Choice
    from lmadda.core.registry_names import file_sha256
    from lmadda.sweep.promotion import _promote_label_free

    log(root)
    client, runs = _store(root)
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(in_channels=1, out_channels=2, ngf=2, depth=6))
    choice = Choice(chosen="unadapted", fell_back=True, reason="nothing confidently better", score="consensus")
    checkpoint = GeneratorCheckpoint(generator=generator, markers=["dapi", "cd29"], setting="phase_contrast",
                                     metadata={"label_free_choice": choice.as_dict()})
    monkeypatch.setattr(label_free, "choose_per_target", lambda *args: {"phase_contrast+overexposure:2": {
        "choice": choice, "run": None, "checkpoint": checkpoint}})
    promoted = _promote_label_free(client, runs[0].info.experiment_id, runs, sweep=object(), log=lambda *_: None)
    assert sorted(p["model"] for p in promoted) == ["lmadda-cd29", "lmadda-dapi"]
    stored = Path(client.download_artifacts(promoted[0]["run_id"], "generator/generator.pt", str(root / "check")))
    for entry in promoted:
        assert client.get_model_version(entry["model"], entry["version"]).tags["sha256"] == file_sha256(stored)


def test_no_mlflow_param_or_tag_holds_a_local_absolute_path(root):
    """A store is read from other machines: the sweep's inputs are recorded by file name and SHA-256, and MLflow's own
    source tags (the script that ran, a local clone's remote) do not name this machine's folders (issue 28)."""
    (root / "source.pt").write_bytes(b"source weights")
    (root / "manifest.parquet").write_bytes(b"manifest")
    log(root)
    _, runs = _store(root)
    recorded = [(kind, key, value) for run in runs for kind, values in (("param", run.data.params), ("tag", run.data.tags))
                for key, value in values.items()]
    assert not [entry for entry in recorded if str(entry[2]).startswith("/") or str(root) in str(entry[2])], recorded
    sweep = next(run for run in runs if run.data.tags.get("lmadda.kind") == "sweep")
    assert sweep.data.params["source_checkpoint"] == "source.pt"
    assert sweep.data.params["source_checkpoint_sha256"] == hashlib.sha256(b"source weights").hexdigest()
    assert sweep.data.params["manifest"] == "manifest.parquet"
