"""Ray Train / Tune / MLflow end to end on CPU, one Ray instance per session (marked slow)."""

import math

import mlflow
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def _loop_config(tiny_synth, tiny_source, **adapt):
    return {"source_checkpoint": str(tiny_source), "manifest": str(tiny_synth.source), "source_setting": "phase_contrast",
            "target_setting": "bright_field", "shift": None,
            "adapt": {"layer": [2], "steps": 4, "batch_size": 2, "crop_size": 64, "log_every": 2,
                      "gate_accuracy": None, "d_warmup_steps": 0, **adapt}, "tags": {"layer": 2}}


def test_worker_runs_in_process_with_zero_workers_and_reports_labelled_pearson(ray_session, tiny_synth, tiny_source, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tune.train_workers import adaptation_worker

    trainer = TorchTrainer(adaptation_worker, train_loop_config=_loop_config(tiny_synth, tiny_source),
                           scaling_config=ScalingConfig(num_workers=0), run_config=RunConfig(name="local", storage_path=str(tmp_path)))
    result = trainer.fit()
    assert result.metrics["step"] == 4 and result.metrics["done"] == 1.0
    assert -1 <= result.metrics["pearson_dapi"] <= 1 and "pearson_cd29" in result.metrics


def _sweep(tiny_synth, tiny_source, tmp_path, name, **overrides):
    from tune.sweep_config import SweepConfig

    data = {
        "name": name, "storage_path": str(tmp_path / "sweeps"), "source": {"checkpoint": str(tiny_source)},
        "data": {"manifest": str(tiny_synth.source), "source_setting": "phase_contrast", "target_setting": "phase_contrast", "shift": "overexposure"},
        "grid": {"layer": [1, 11], "lr": [1e-4], "magnitude": [2.0]},
        "adapt": {"steps": 4, "batch_size": 2, "crop_size": 64, "log_every": 2, "gate_accuracy": None, "d_warmup_steps": 0},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.5, "max_concurrent_trials": 2},
    }
    data.update(overrides)
    return SweepConfig.model_validate(data)


def test_two_trial_sweep_writes_table_mlflow_runs_and_a_registry_alias(ray_session, tiny_synth, tiny_source, tmp_path):
    from tune.sweep import run_sweep
    from tune.tracking import promote

    sweep = _sweep(tiny_synth, tiny_source, tmp_path, "two")
    rows = run_sweep(sweep, log=lambda *_: None)
    table = pq.read_table(sweep.storage_path / "two" / "results.parquet").to_pylist()
    assert sorted(r["layer"] for r in table) == [1, 11] and all(r["steps_done"] == 4 for r in rows)
    assert all(not r["collapsed"] and math.isfinite(r["pearson_dapi"]) for r in table)

    mlflow.set_tracking_uri(sweep.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(sweep.experiment)
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("lmadda.kind") == "trial"]
    parent = [r for r in runs if r.data.tags.get("lmadda.kind") == "sweep"]
    assert len(trials) == 2 and len(parent) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in trials)
    assert {r.data.params["layer"] for r in trials} == {"1", "11"}
    assert len(client.get_metric_history(trials[0].info.run_id, "g_loss")) == 2  # the curve, by step

    again = run_sweep(sweep, resume=True, log=lambda *_: None)  # a finished sweep: nothing redone, nothing logged twice
    assert sorted(r["layer"] for r in again) == [1, 11]
    assert len([r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("lmadda.kind") == "trial"]) == 2

    promoted = promote(sweep.tracking_uri, sweep.experiment, log=lambda *_: None)
    assert {p["model"] for p in promoted} == {"lmadda-dapi", "lmadda-cd29"}
    version = client.get_model_version_by_alias("lmadda-dapi", "phase_contrast-overexposure-2")
    assert version.tags["criterion"] == "pearson"


def test_stopper_ends_a_diverging_trial_and_the_table_marks_it_collapsed(ray_session, tiny_synth, tiny_source, tmp_path):
    from tune.sweep import run_sweep

    sweep = _sweep(tiny_synth, tiny_source, tmp_path, "diverge",
                   grid={"layer": [3], "lr": [1.0], "magnitude": [2.0]},
                   adapt={"steps": 40, "batch_size": 2, "crop_size": 64, "log_every": 2, "gate_accuracy": None,
                          "d_warmup_steps": 0, "stop_on_collapse": False, "collapse_g_loss": 1e9},
                   stop={"g_loss_bound": 0.5, "d_saturation_accuracy": 0.99, "d_saturation_patience": 5})
    rows = run_sweep(sweep, log=lambda *_: None)
    assert len(rows) == 1 and rows[0]["collapsed"] and "> 0.5" in rows[0]["collapse_reason"]
    assert rows[0]["steps_done"] < 40
