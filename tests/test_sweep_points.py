"""A sweep trial's grid points, run one after another by `run_points` (no Ray instance: the runner is plain code).

What a trial of several points must keep from a trial per point: one report stream per point, a collapse that ends
only its own point, and a restart that neither redoes a finished point nor changes where an unfinished one ends up.
"""

from __future__ import annotations

import pytest
import torch

import lmadda_tune.train_workers as workers
from lmadda.checkpoint import load_checkpoint
from lmadda.training.adapt import Adapter
from lmadda_tune.train_workers import GENERATOR_FILE, PointStore, run_points


def _config(tiny_synth, tiny_source, layers=(1, 2)) -> dict:
    return {"source_checkpoint": str(tiny_source), "manifest": str(tiny_synth.source), "source_setting": "phase_contrast",
            "adapt": {"steps": 4, "batch_size": 2, "crop_size": 64, "log_every": 2, "gate_accuracy": None, "d_warmup_steps": 0},
            "points": [{"key": f"L{layer}", "target": "bright_field", "adapt": {"layer": [layer], "lr": 1e-3, "seed": 0}, "tags": {"layer": layer}}
                       for layer in layers]}


def _run(config, store, reports: list, stop_after: int | None = None) -> None:
    """run_points in this process, its reports collected as a Tune trial would see them (and the trial killed after
    `stop_after` reports)."""
    class Killed(Exception):
        pass

    def report(metrics: dict, folder) -> None:
        if folder is not None:
            metrics = {**metrics, "checkpoint_path": str(store.keep(metrics["point"], int(metrics["step"]), folder))}
        reports.append(metrics)
        if stop_after is not None and len(reports) == stop_after:
            raise Killed

    try:
        run_points(config, world_size=1, rank=0, device=torch.device("cpu"), store=store, report=report)
    except Killed:
        pass


def test_a_trial_of_several_points_loads_the_shared_data_once_and_reports_every_point(tiny_synth, tiny_source, tmp_path, monkeypatch):
    loads = []
    original = workers.load_checkpoint
    monkeypatch.setattr(workers, "load_checkpoint", lambda path: loads.append(path) or original(path))
    reports = []
    _run(_config(tiny_synth, tiny_source, layers=(1, 2, 3)), PointStore(tmp_path), reports)
    assert len(loads) == 1  # the source model, once for three points
    assert [(r["point"], r["step"], r["point_done"]) for r in reports] == [
        ("L1", 2, 0.0), ("L1", 4, 1.0), ("L2", 2, 0.0), ("L2", 4, 1.0), ("L3", 2, 0.0), ("L3", 4, 1.0)]
    assert all(r["points_in_trial"] == 3 and "done" not in r for r in reports)  # Tune ends a trial on `done`
    final = [r for r in reports if r["point_done"]]
    assert all(-1 <= r["pearson_dapi"] <= 1 and "lf_output_w1" in r for r in final)  # each point evaluated
    assert [load_checkpoint(f"{r['checkpoint_path']}/{GENERATOR_FILE}").metadata["layer"] for r in final] == [1, 2, 3]
    assert not any((tmp_path / "L1").glob(f"step_2/{GENERATOR_FILE}"))  # the generator is written at a point's end only


def test_a_collapse_ends_its_own_point_and_the_trial_goes_on_with_the_next(tiny_synth, tiny_source, tmp_path, monkeypatch):
    class CollapsesAtLayerOne(Adapter):
        def step(self):
            record = super().step()
            if record is not None and self.config.layer == [1]:
                self.result.collapsed, self.result.collapse_reason = True, "test collapse"
                record.update(collapsed=True, collapse_reason="test collapse")
            return record

    monkeypatch.setattr(workers, "Adapter", CollapsesAtLayerOne)
    config = _config(tiny_synth, tiny_source)
    config["adapt"]["stop_on_collapse"] = False  # the point ends on the flag even so, as a single-point trial's stopper ends it
    reports = []
    _run(config, PointStore(tmp_path), reports)
    assert [(r["point"], r["step"], r["collapsed"], r["point_done"]) for r in reports] == [
        ("L1", 2, 1.0, 1.0), ("L2", 2, 0.0, 0.0), ("L2", 4, 0.0, 1.0)]
    assert (tmp_path / "L1" / "step_2" / GENERATOR_FILE).is_file()  # the collapsed point's model is kept, marked collapsed


def test_a_restarted_trial_reports_its_finished_points_again_without_redoing_them_and_resumes_the_next(tiny_synth, tiny_source, tmp_path):
    config = _config(tiny_synth, tiny_source)
    store = PointStore(tmp_path / "killed")
    first = []
    _run(config, store, first, stop_after=3)  # killed after L1 finished and L2 reported step 2
    finished = store.latest("L1") / GENERATOR_FILE
    written = finished.stat().st_mtime_ns

    again = []
    _run(config, PointStore(tmp_path / "killed"), again)
    assert [(r["point"], r["step"]) for r in again] == [("L1", 4), ("L2", 4)]  # L1 only re-reported, L2 from step 2 on
    assert again[0] == first[1]  # the same final report, evaluations and kept folder included
    assert finished.stat().st_mtime_ns == written

    uninterrupted = []
    _run(config, PointStore(tmp_path / "uninterrupted"), uninterrupted)
    assert again[-1]["g_loss"] == uninterrupted[-1]["g_loss"] and again[-1]["pearson_dapi"] == uninterrupted[-1]["pearson_dapi"]
    resumed = load_checkpoint(f"{again[-1]['checkpoint_path']}/{GENERATOR_FILE}").generator.state_dict()
    straight = load_checkpoint(f"{uninterrupted[-1]['checkpoint_path']}/{GENERATOR_FILE}").generator.state_dict()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_an_old_unversioned_state_in_a_trial_folder_stops_the_trial_with_the_fix(tiny_synth, tiny_source, tmp_path):
    from lmadda.core.errors import LmaddaError

    (tmp_path / "L1" / "step_2").mkdir(parents=True)
    torch.save({"step": 2}, tmp_path / "L1" / "step_2" / workers.STATE_FILE)  # what lmadda wrote before states were versioned
    with pytest.raises(LmaddaError, match=r"older lmadda.*delete .*L1"):
        _run(_config(tiny_synth, tiny_source), PointStore(tmp_path), [])


def test_a_sweep_scores_the_test_images_the_study_scores_for_a_seeded_shift(tiny_synth, tiny_source):
    import numpy as np

    from lmadda.data.shifts import Shift
    from lmadda.study.grid import ImageSource

    source = load_checkpoint(tiny_source)
    noise = Shift.parse("noise:0.2")  # a seeded shift: each seed draws its own noise
    for seed in (0, 1):
        swept = workers.labelled_test_images(tiny_synth, "phase_contrast", noise, source, seed)
        studied = ImageSource(tiny_synth).load("phase_contrast", "test", source.markers, shift=noise,
                                               percentiles=source.percentiles, seed=seed + 7)  # lmadda.study.grid.run_grid's draw
        assert len(swept) == len(studied) > 0
        for a, b in zip(swept, studied):
            np.testing.assert_array_equal(a.input, b.input)
