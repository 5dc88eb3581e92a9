import pytest
import yaml

from lmadda.core.config import build_config
from lmadda.core.errors import LmaddaError
from lmadda_tune.stopper import ModeCollapseStopper
from lmadda.sweep.config import SweepConfig
from lmadda.core.registry_names import alias_for


def _config(**changes):
    data = {
        "name": "s", "storage_path": "out", "source": {"checkpoint": "src.pt"},
        "data": {"manifest": "m.parquet"},
        "grid": {"targets": ["phase_contrast+overexposure:1.5", "phase_contrast+overexposure:2"], "layers": [0, 15], "lrs": [1e-5, 1e-4], "paper_layers": []},
    }
    for key, value in changes.items():
        data[key] = value
    return build_config(SweepConfig, None, **data)


def test_grid_expands_to_every_point_in_a_stable_order():
    from lmadda.study.trial import GridPoint

    points = _config().points(16)
    assert len(points) == 8
    assert points[0] == GridPoint("phase_contrast+overexposure:1.5", (0,), 1e-5, 0)
    assert len(_config(grid={"targets": ["bright_field"], "layers": "all", "lrs": [1e-4], "paper_layers": []}).points(16)) == 16


def test_the_sweeps_grid_is_the_studys_paper_recipe_and_layer_sets_included():
    from lmadda.study.config import Grid

    grid = {"targets": ["bright_field", "phase_contrast+overexposure:2"], "layers": [0, 7], "lrs": [1e-5, 1e-4],
            "layer_sets": [[0, 7]], "seeds": [0, 1]}
    sweep = _config(grid=grid)
    assert sweep.points(16) == Grid(**grid).points(16)  # one spec, one expansion
    paper = [p for p in sweep.points(16) if p.recipe == "paper"]
    assert {(p.target, p.layers, p.lr, p.seed) for p in paper} == {(t, (15,), 2e-4, s) for t in grid["targets"] for s in (0, 1)}
    assert {p.method(15) for p in sweep.points(16)} == {"lmadda", "lmadda_multi", "adda_paper"}
    options = paper[0].adapt_options({"steps": 9, "gate_accuracy": 0.7})
    assert options == {"steps": 9, "recipe": "paper", "layer": [15], "seed": paper[0].seed}  # the recipe fixes the rest


def test_a_config_of_the_sweeps_old_grid_is_refused_with_its_rewrite():
    old = {"name": "s", "storage_path": "out", "source": {"checkpoint": "src.pt"},
           "data": {"manifest": "m.parquet", "target_setting": "phase_contrast", "shift": "overexposure"},
           "grid": {"layer": [0, 15], "lr": [1e-4], "magnitude": [1.5, 2.0]}}
    with pytest.raises(LmaddaError, match=r'"targets": \["phase_contrast\+overexposure:1.5", "phase_contrast\+overexposure:2"\], '
                                          r'"layers": \[0, 15\], "lrs": \[0.0001\], "seeds": \[0\], "paper_layers": \[\]'):
        build_config(SweepConfig, None, **old)


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    resolved = _config().resolved(tmp_path)
    assert resolved.storage_path == tmp_path / "out" and resolved.source.checkpoint == tmp_path / "src.pt"
    assert resolved.tracking_uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # as the k8s ConfigMap sets it
    assert resolved.tracking_uri == "http://mlflow:5000"


@pytest.mark.parametrize("uri", ["s3://bucket/sweeps", "gs://bucket/sweeps", "file:///tmp/sweeps"])
def test_an_object_store_uri_as_storage_path_is_refused_not_made_a_local_folder(uri):
    fields = {"name": "s", "storage_path": uri, "source": {"checkpoint": "src.pt"},
              "data": {"manifest": "m.parquet", "source_setting": "phase_contrast"}, "grid": {"targets": ["bright_field"]}}
    with pytest.raises(LmaddaError, match="storage_path .* is a URI; .* a folder every node of the cluster sees"):
        build_config(SweepConfig, None, **fields)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grid": {"targets": ["bright_field"], "layers": [0], "lrs": [-1.0]}}, "learning rates must be positive"),
        ({"grid": {"layers": [0], "lrs": [1e-4]}}, "grid.targets"),
        ({"grid": {"targets": ["phase_contrast+blur:2"], "layers": [0]}}, "blur"),
        ({"grid": {"targets": ["phase_contrast+overexposure:0.5"], "layers": [0]}}, "magnitude 0.5 out of range"),
        ({"adapt": {"stop_on_collapse": False}}, "ends where it collapses"),
        ({"adapt": {"layer": 3}}, "come from the grid"),
        ({"adapt": {"stepz": 3}}, "stepz"),
        ({"resourcez": {}}, "unknown option 'resourcez'"),
        ({"source": {"checkpoint": "s.pt", "train": {"manifest": "m", "epochz": 2}}}, "epochz"),
        ({"source": {"checkpoint": "s.pt", "train": {"manifest": "m", "device": "cuda"}}}, "comes from the Ray Train worker"),
        ({"adapt": {"batch_size": 3}, "resources": {"workers_per_trial": 2}}, "must split evenly over resources.workers_per_trial = 2"),
    ],
)
def test_bad_sweep_configs_name_the_problem(changes, message):
    with pytest.raises(LmaddaError, match=message):
        _config(**changes)


def test_every_shipped_sweep_config_validates_and_keeps_what_its_file_says():
    from pathlib import Path

    paths = sorted((Path(__file__).parents[1] / "tune" / "configs").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"quick", "paper"}
    for path in paths:
        raw = yaml.safe_load(path.read_text())
        sweep = build_config(SweepConfig, None, **raw)
        assert sweep.name == raw["name"], path
        assert sweep.grid.layers == raw["grid"]["layers"] and sweep.grid.lrs == raw["grid"]["lrs"], path
        assert sweep.grid.targets == raw["grid"]["targets"], path


def test_the_stopper_reads_the_adaptation_loops_collapse_verdict_and_remembers_why():
    stopper = ModeCollapseStopper()
    assert not stopper("a", {"step": 10, "g_loss": 0.7, "d_acc": 0.6, "collapsed": 0.0, "collapse_reason": ""})
    assert stopper("a", {"step": 20, "g_loss": 25.0, "collapsed": 1.0, "collapse_reason": "generator loss 25 > bound 20 at step 20"})
    assert stopper.reasons["a"] == "generator loss 25 > bound 20 at step 20"
    assert stopper("a", {"step": 30, "collapsed": 1.0, "collapse_reason": "later"}) and stopper.reasons["a"].startswith("generator")
    assert not stopper("b", {"step": 10, "g_loss": 50.0, "d_acc": 1.0})  # no verdict in the report: the loop decides, not this
    assert not stopper("d", {"pearson": 0.5})  # reports without losses are not judged


def test_the_stopper_never_ends_a_trial_of_several_points_on_one_points_collapse():
    stopper = ModeCollapseStopper()
    collapsed = {"step": 2, "collapsed": 1.0, "collapse_reason": "generator loss 25 > bound 20 at step 2", "points_in_trial": 3}
    assert not stopper("g", {**collapsed, "point": "L1-lr0.0001-m2-s0"})  # the point runner ends that point, the trial goes on
    assert not stopper("g", {"step": 2, "collapsed": 0.0, "point": "L3-lr0.0001-m2-s0", "points_in_trial": 3})
    assert stopper.reasons == {"g/L1-lr0.0001-m2-s0": "generator loss 25 > bound 20 at step 2"}
    assert stopper("h", {**collapsed, "point": "L1-lr0.0001-m2-s0", "points_in_trial": 1})  # a trial of one point ends with it


def test_the_grid_is_dealt_into_trials_that_mix_layers_and_load_each_target_once():
    sweep = _config(grid={"targets": ["phase_contrast+overexposure:1.5", "phase_contrast+overexposure:2"], "layers": [0, 1, 2, 3], "lrs": [1e-4], "paper_layers": []},
                    resources={"workers_per_trial": 0, "max_concurrent_trials": 2, "points_per_trial": 4})
    groups = sweep.trial_groups(16)
    assert [[(p.domain.shift.magnitude, p.layers) for p in group] for group in groups] == [
        [(1.5, (0,)), (1.5, (3,)), (2.0, (0,)), (2.0, (3,))],  # dealt back and forth: 0 and 3, 1 and 2 share a trial
        [(1.5, (1,)), (1.5, (2,)), (2.0, (1,)), (2.0, (2,))]]
    assert sorted(p.key for group in groups for p in group) == sorted(p.key for p in sweep.points(16))  # each point once
    assert len({p.key for group in groups for p in group}) == 8
    assert groups[0][1].key == "phase_contrast-overexposure-1_5-L3-lr0.0001-s0"


@pytest.mark.parametrize("resources, sizes", [
    ({"workers_per_trial": 0, "max_concurrent_trials": 2}, [4, 4]),  # auto, in the trial's process: one trial per slot
    ({"workers_per_trial": 0, "max_concurrent_trials": 3}, [3, 3, 2]),
    ({"workers_per_trial": 1, "max_concurrent_trials": 2}, [1] * 8),  # auto, worker groups: a point per trial
    ({"workers_per_trial": 1, "points_per_trial": 3}, [3, 3, 2]),
    ({"workers_per_trial": 0, "points_per_trial": 1}, [1] * 8),
])
def test_points_per_trial_auto_fills_each_concurrent_slot_once_in_process_and_keeps_worker_group_trials_single(resources, sizes):
    sweep = _config(resources=resources)
    assert sorted(map(len, sweep.trial_groups(16)), reverse=True) == sizes


def test_points_per_trial_must_be_positive():
    with pytest.raises(LmaddaError, match="points_per_trial must be at least 1"):
        _config(resources={"points_per_trial": 0})


def test_the_old_stop_section_names_where_its_thresholds_went():
    with pytest.raises(LmaddaError, match="collapse_g_loss.*saturation_collapses"):
        build_config(SweepConfig, None, **{**_config().model_dump(mode="json"), "stop": {"g_loss_bound": 20}})


def test_registry_aliases_are_valid_names():
    assert alias_for("bright_field") == "bright_field"
    assert alias_for("phase_contrast+overexposure:2.5") == "phase_contrast-overexposure-2_5"


def test_a_missing_source_checkpoint_without_training_options_names_both_fixes(tmp_path):
    from lmadda_tune.sweep import train_source_stage

    with pytest.raises(LmaddaError, match="lmadda train-source.*source.train"):
        train_source_stage(_config().resolved(tmp_path))


def test_source_training_options_resolve_their_manifest(tmp_path):
    resolved = _config(source={"checkpoint": "s.pt", "train": {"manifest": "data/m.parquet"}}).resolved(tmp_path)
    assert resolved.source.train["manifest"] == str(tmp_path / "data" / "m.parquet")


def test_a_sweep_grid_names_the_moment_matching_family_and_refuses_self_training():
    grid = {"targets": ["bright_field"], "layers": [0], "lrs": [1e-5], "paper_layers": [], "families": ["lmadda", "moments"],
            "family_layers": [3]}
    points = _config(grid=grid).points(16)
    moments = [p for p in points if p.family == "moments"]
    assert [(p.layers, p.lr, p.method(15)) for p in moments] == [((3,), 1e-4, "moments")]
    assert moments[0].adapt_options({"steps": 5})["adversary"] == "moments" and "moments" in moments[0].key
    with pytest.raises(LmaddaError, match="self_training.*run in the study"):
        _config(grid={**grid, "families": ["lmadda", "self_training"]})


def test_relative_paths_are_refused_in_a_ray_jobs_copy_of_the_repository_and_resolve_against_base_dir(tmp_path):
    """Under `ray job submit --working-dir .` the driver runs in Ray's copy of the repository, which has no git-ignored
    files and is deleted after the job: relative paths there would find no input and hide the results."""
    from lmadda.sweep.config import paths_base

    job_copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    with pytest.raises(LmaddaError, match="uploaded copy of the repository.*storage_path: out.*--base-dir \\$PWD"):
        paths_base(_config(), None, job_copy)
    assert paths_base(_config(), tmp_path, job_copy) == tmp_path
    resolved = _config().resolved(paths_base(_config(), tmp_path, job_copy))
    assert resolved.source.checkpoint == tmp_path / "src.pt" and resolved.storage_path == tmp_path / "out"
    absolute = _config(storage_path=str(tmp_path / "out"), source={"checkpoint": str(tmp_path / "src.pt")},
                       data={"manifest": str(tmp_path / "m.parquet")})
    assert paths_base(absolute, None, job_copy) == job_copy  # nothing relative: nothing to refuse
    assert paths_base(_config(), None, tmp_path) == tmp_path  # an ordinary working directory
    with pytest.raises(LmaddaError, match="must be an absolute folder"):
        paths_base(_config(), tmp_path.relative_to(tmp_path.anchor), job_copy)
