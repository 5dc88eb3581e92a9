"""Ray Train / Tune / MLflow end to end on CPU, one Ray instance per session (marked slow)."""

import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

import mlflow
import pyarrow.parquet as pq
import pytest

from lmadda.core.errors import LmaddaError
from mlflow.tracking import MlflowClient
from lmadda_tune.train_workers import GENERATOR_FILE

pytestmark = pytest.mark.slow


def _loop_config(tiny_synth, tiny_source, **adapt):
    return {"source_checkpoint": str(tiny_source), "manifest": str(tiny_synth.source), "source_setting": "phase_contrast",
            "target": "bright_field",
            "adapt": {"layer": [2], "steps": 4, "batch_size": 2, "crop_size": 64, "log_every": 2,
                      "gate_accuracy": None, "d_warmup_steps": 0, **adapt}, "tags": {"layer": 2}}


def test_worker_runs_in_process_with_zero_workers_and_reports_labelled_pearson(ray_session, tiny_synth, tiny_source, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lmadda_tune.train_workers import adaptation_worker

    trainer = TorchTrainer(adaptation_worker, train_loop_config=_loop_config(tiny_synth, tiny_source),
                           scaling_config=ScalingConfig(num_workers=0), run_config=RunConfig(name="local", storage_path=str(tmp_path)))
    result = trainer.fit()
    assert result.metrics["step"] == 4 and result.metrics["point_done"] == 1.0
    assert -1 <= result.metrics["pearson_dapi"] <= 1 and "pearson_cd29" in result.metrics


def _sweep(tiny_synth, tiny_source, tmp_path, name, **overrides):
    from lmadda.sweep.config import SweepConfig

    data = {
        "name": name, "storage_path": str(tmp_path / "sweeps"), "source": {"checkpoint": str(tiny_source)},
        "data": {"manifest": str(tiny_synth.source), "source_setting": "phase_contrast"},
        "grid": {"targets": ["phase_contrast+overexposure:2"], "layers": [1, 11], "lrs": [1e-4], "paper_layers": []},
        "adapt": {"steps": 4, "batch_size": 2, "crop_size": 64, "log_every": 2, "gate_accuracy": None, "d_warmup_steps": 0},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.5, "max_concurrent_trials": 2},
    }
    data.update(overrides)
    return SweepConfig.model_validate(data)


def test_a_two_point_sweep_writes_table_mlflow_runs_and_a_registry_alias(ray_session, tiny_synth, tiny_source, tmp_path):
    from lmadda.checkpoint import load_checkpoint
    from lmadda_tune.sweep import run_sweep
    from lmadda.sweep.promotion import promote

    # The source model does not exist yet: the sweep trains it first (Ray Train), then adapts it.
    trained = tmp_path / "models" / "source.pt"
    source = {"checkpoint": str(trained), "train": {"manifest": str(tiny_synth.source), "markers": ["dapi", "cd29"], "ngf": 4,
                                                    "depth": 6, "ndf": 4, "crop_size": 64, "batch_size": 2, "crops_per_epoch": 4, "epochs": 1}}
    # Both points in one trial: one worker group adapts them in turn; the table and MLflow still get one of each.
    sweep = _sweep(tiny_synth, tiny_source, tmp_path, "two", source=source,
                   resources={"workers_per_trial": 1, "cpus_per_worker": 0.5, "max_concurrent_trials": 2, "points_per_trial": 2})
    rows = run_sweep(sweep, log=lambda *_: None)
    assert load_checkpoint(trained).markers == ["dapi", "cd29"]
    table = pq.read_table(sweep.storage_path / "two" / "points.parquet").to_pylist()
    assert sorted(r["layer"] for r in table) == [1, 11] and all(r["steps_done"] == 4 for r in rows)
    # The result rows are the study's: one per model x test image x marker, the unadapted reference among them.
    results = pq.read_table(sweep.storage_path / "two" / "results.parquet").to_pylist()
    assert {(r["method"], r["layer"]) for r in results} == {("unadapted", -1), ("lmadda", 1), ("adda", 11)}  # 11: the last layer
    assert {r["marker"] for r in results} == {"dapi", "cd29"} and {r["target"] for r in results} == {"phase_contrast+overexposure:2"}
    for point in table:  # a point's Pearson is the mean of its rows
        mine = [r["pearson"] for r in results if r["layer"] == point["layer"] and r["marker"] == "dapi"]
        assert point["pearson_dapi"] == pytest.approx(sum(mine) / len(mine))
    assert len({r["trial_id"] for r in table}) == 1 and all(r["trial_points"] == 2 for r in table)
    assert not any(Path(r["generator_path"]).is_absolute() for r in table)  # relative to the storage: the table travels
    assert {load_checkpoint(sweep.storage_path / r["generator_path"]).metadata["layer"] for r in table} == {1, 11}
    assert any((sweep.storage_path / "mlartifacts").rglob("generator.pt"))  # artifacts beside the SQLite store
    assert all(not r["collapsed"] and math.isfinite(r["pearson_dapi"]) for r in table)

    mlflow.set_tracking_uri(sweep.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(sweep.experiment)
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("lmadda.kind") == "trial"]
    parent = [r for r in runs if r.data.tags.get("lmadda.kind") == "sweep"]
    assert len(trials) == 2 and len(parent) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in trials)
    assert "unadapted.phase_contrast-overexposure-2.pearson_dapi" in parent[0].data.metrics  # the reference to beat
    assert (sweep.storage_path / "two" / "report" / "lr_0.0001" / "pearson_by_layer.png").is_file()
    assert {a.path for a in client.list_artifacts(parent[0].info.run_id, "report")} >= {"report/summary.txt", "report/best.parquet"}
    assert {r.data.params["layer"] for r in trials} == {"1", "11"}
    assert len(client.get_metric_history(trials[0].info.run_id, "g_loss")) == 2  # the curve, by step

    again = run_sweep(sweep, resume=True, log=lambda *_: None)  # a finished sweep: nothing redone, nothing logged twice
    assert sorted(r["layer"] for r in again) == [1, 11]
    assert len([r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("lmadda.kind") == "trial"]) == 2

    promoted = promote(sweep.tracking_uri, sweep.experiment, log=lambda *_: None)
    assert {p["model"] for p in promoted} == {"lmadda-dapi", "lmadda-cd29"}
    version = client.get_model_version_by_alias("lmadda-dapi", "phase_contrast-overexposure-2")
    assert version.tags["criterion"] == "pearson"
    assert all(math.isfinite(r["lf_output_w1"]) and math.isfinite(r["lf_probe_shift"]) for r in table)  # label-free, every trial
    # another criterion moves the serving alias only on purpose (--replace; without it, it lands beside: test_promotion_*)
    relabelled = promote(sweep.tracking_uri, sweep.experiment, criterion="lf_output_w1", replace=True, log=lambda *_: None)
    best = min(table, key=lambda r: r["lf_output_w1"])
    assert all(p["lf_output_w1"] == pytest.approx(best["lf_output_w1"]) for p in relabelled)  # the lowest one, not the highest
    assert client.get_model_version_by_alias("lmadda-dapi", "phase_contrast-overexposure-2").tags["criterion"] == "lf_output_w1"

    # Without labels: the one label-free selector, over the unadapted model, the cheap corrections and both trials.
    with pytest.raises(LmaddaError, match="needs the sweep config"):
        promote(sweep.tracking_uri, sweep.experiment, criterion="label_free", log=lambda *_: None)
    chosen = promote(sweep.tracking_uri, sweep.experiment, criterion="label_free", sweep=sweep, replace=True, log=lambda *_: None)
    assert {p["model"] for p in chosen} == {"lmadda-dapi", "lmadda-cd29"} and len({p["chosen"] for p in chosen}) == 1
    assert chosen[0]["chosen"] in {"unadapted", "adabn", "histogram_matching"} | {f"lmadda:{l}@0.0001/seed0" for l in (1, 11)}
    version = client.get_model_version_by_alias("lmadda-cd29", "phase_contrast-overexposure-2")
    assert version.tags["criterion"] == "label_free" and version.tags["chosen"] == chosen[0]["chosen"] and version.tags["reason"]
    served = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "served")))
    served = load_checkpoint(next(served.rglob("*.pt")) if served.is_dir() else served)  # a LoggedModel's folder, or the file
    assert served.metadata["label_free_choice"]["chosen"] == chosen[0]["chosen"]


def test_a_collapse_ends_its_point_not_its_trial_and_the_table_marks_it_collapsed(ray_session, tiny_synth, tiny_source, tmp_path):
    from lmadda_tune.sweep import run_sweep

    sweep = _sweep(tiny_synth, tiny_source, tmp_path, "diverge",
                   grid={"targets": ["phase_contrast+overexposure:2"], "layers": [1, 3], "lrs": [1.0], "paper_layers": []},
                   adapt={"steps": 40, "batch_size": 2, "crop_size": 64, "log_every": 2, "gate_accuracy": None,
                          "d_warmup_steps": 0, "collapse_g_loss": 0.5},
                   # in the trial's own process, both points in one trial (points_per_trial auto, one slot)
                   resources={"workers_per_trial": 0, "cpus_per_worker": 1, "max_concurrent_trials": 1})
    rows = run_sweep(sweep, log=lambda *_: None)
    assert sorted(r["layer"] for r in rows) == [1, 3] and len({r["trial_id"] for r in rows}) == 1
    # the first point's collapse did not end the trial: the second point ran and collapsed on its own
    assert all(r["collapsed"] and "> bound 0.5" in r["collapse_reason"] and r["steps_done"] < 40 for r in rows)
    assert all(r["generator_path"] and not r["error"] for r in rows)
    (trial,) = (sweep.storage_path / "train").glob("diverge-*")  # in-trial reports: one folder per point, the latest kept
    for row in rows:
        assert [p.name for p in (trial / row["point"]).glob("step_*")] == [f"step_{row['steps_done']}"]


@pytest.mark.parametrize("resources", [
    {"workers_per_trial": 1, "cpus_per_worker": 0.5, "max_concurrent_trials": 1},  # a worker group per point
    {"workers_per_trial": 0, "cpus_per_worker": 1, "max_concurrent_trials": 1},  # one in-process trial of all three points
], ids=["worker-group-per-point", "in-process-group"])
def test_a_killed_sweep_driver_resumes_and_runs_only_the_unfinished_points(ray_session, tiny_synth, tiny_source, tmp_path, resources):
    from lmadda_tune.sweep import run_sweep

    sweep = _sweep(tiny_synth, tiny_source, tmp_path, "killed",
                   grid={"targets": ["phase_contrast+overexposure:2"], "layers": [1, 2, 11], "lrs": [1e-4], "paper_layers": []},
                   resources=resources)
    grouped = len(sweep.trial_groups(16)) == 1
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(sweep.model_dump(mode="json")))
    experiment = sweep.storage_path / "killed"
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "lmadda_tune.sweep", "--config", str(config),
                               "--address", ray_session.get_runtime_context().gcs_address],
                              cwd=Path(__file__).parents[1], stdout=log, stderr=subprocess.STDOUT)
    first_point = sweep.storage_path / "train"
    try:
        deadline = time.monotonic() + 240

        def first_point_finished() -> bool:
            if grouped:  # the first point's last report keeps its generator; the trial goes on with the second
                return any(first_point.glob(f"killed-*/phase_contrast-overexposure-2-L1-lr0.0001-s0/step_4/{GENERATOR_FILE}"))
            return len(list(experiment.glob("trial_driver_*"))) >= 2  # one trial at a time: the first has finished

        while not first_point_finished():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sweep did not finish its first point in 240 s"
            time.sleep(0.2)
        if grouped:  # killed inside its one trial: the last point has not finished
            assert not any(first_point.glob(f"killed-*/phase_contrast-overexposure-2-L11-lr0.0001-s0/step_4/{GENERATOR_FILE}"))
        else:
            time.sleep(4)  # longer than the driver's state-saving period (TUNE_GLOBAL_CHECKPOINT_S=2)
    finally:
        driver.kill()
        driver.wait()
    if not grouped:  # and as if it was killed while Tune wrote its state: the resume takes Tune's last complete copy
        (state,) = experiment.glob("experiment_state-*.json")
        state.write_bytes(b"")
    (generator,) = first_point.glob(f"killed-*/phase_contrast-overexposure-2-L1-lr0.0001-s0/step_4/{GENERATOR_FILE}")
    written = generator.stat().st_mtime_ns
    trial_stores = sorted(first_point.glob("killed-*"))  # one per trial id: a trial started afresh would add one
    first = next(experiment.glob("trial_driver_*_00000_*")) / "result.json"
    # One trial per point: the first trial has finished, its results are written. Grouped, the driver was killed
    # mid-trial, maybe before it wrote any result of the trial: there is nothing of it to compare.
    finished_before = None if grouped else first.read_bytes()
    if not grouped:
        assert finished_before.count(b"\n") == 2  # both reports of 4 steps (log_every 2)

    rows = run_sweep(sweep, resume=True, log=lambda *_: None)
    assert sorted(r["layer"] for r in rows) == [1, 2, 11]
    assert all(r["steps_done"] == 4 and not r["error"] and r["generator_path"] for r in rows)
    assert generator.stat().st_mtime_ns == written  # the finished point was not run again
    # its trial was resumed, not started afresh under a new id: one store per trial, the earlier ones among them
    after = sorted(first_point.glob("killed-*"))
    assert set(trial_stores) <= set(after) and len(after) == (1 if grouped else 3)
    if not grouped:
        assert first.read_bytes() == finished_before  # nor was its trial
