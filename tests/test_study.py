"""`lmadda study`: config validation, the image source, and the whole command on tiny simulated data."""

import json

import numpy as np
import pytest
import yaml

from lmadda.cli import main
from lmadda.core.config import build_config
from lmadda.core.errors import LmaddaError
from lmadda.study.config import StudyConfig

EXPERIMENT = {
    "name": "tiny", "title": "Tiny simulated",
    "data": {"simulate": {"fields": 12, "size": 64, "seed": 3}},
    "source": {"setting": "phase_contrast", "markers": ["dapi", "cd29"],
               "train": {"ngf": 4, "depth": 6, "ndf": 4, "crop_size": 64, "batch_size": 2, "epochs": 1, "crops_per_epoch": 4, "device": "cpu"}},
    "grids": [{"targets": ["phase_contrast+overexposure:3", "bright_field"], "layers": [0, 2, 5, 11], "layer_sets": [[0, 5]],
               "lrs": [2.0e-5], "seeds": [0, 1]}],
    "adapt": {"steps": 2, "batch_size": 2, "crop_size": 64, "device": "cpu"},
    "oracle": {"epochs": 1, "crops_per_epoch": 4},
    "criteria": {"crops": 2, "crop_size": 64},
}


def _config(**changes) -> dict:
    experiment = {**EXPERIMENT, **changes}
    return {"experiments": [experiment]}


@pytest.mark.parametrize("change, message", [
    ({"adapt": {"lr": 1e-3}}, "adapt.lr is set by the grids"),
    ({"adapt": {"stop_on_collapse": False}}, "ends where it collapses"),
    ({"data": {"simulate": {"fields": 12}, "index": {"root": "x", "patterns": ["a"]}}}, "exactly one of data.simulate"),
    ({"grids": [{"targets": ["bright_field"], "layer_sets": [[3, 3]]}]}, "needs at least two different layers"),
    ({"grids": [{"targets": ["phase_contrast+overexposur:2"]}]}, "overexposur"),
    ({"baselines": ["adabn", "cyclegan"]}, "unknown baseline"),
    ({"name": "Has Spaces"}, "name"),
])
def test_bad_study_configs_name_the_problem(change, message):
    with pytest.raises(LmaddaError, match=message):
        build_config(StudyConfig, None, **_config(**change))


def test_validation_rows_come_from_the_bottom_of_the_training_fields(tiny_synth):
    from lmadda.study.grid import ImageSource

    whole = ImageSource(tiny_synth).load("phase_contrast", "train", ["dapi"])
    carved = ImageSource(tiny_synth, validation_rows=0.25)
    train, val = carved.load("phase_contrast", "train", ["dapi"]), carved.load("phase_contrast", "val", ["dapi"])
    assert [i.input.shape[1] for i in train] == [48] * len(whole) and [i.input.shape[1] for i in val] == [16] * len(whole)
    np.testing.assert_array_equal(np.concatenate([train[0].input, val[0].input], axis=1), whole[0].input)
    np.testing.assert_array_equal(val[0].target, whole[0].target[:, 48:])
    assert carved.load("phase_contrast", "test", ["dapi"])[0].input.shape[1] == 64  # test fields stay whole


@pytest.mark.slow
def test_study_runs_logs_to_mlflow_writes_the_document_and_reruns_nothing(tmp_path, capsys):
    from lmadda.study.runner import experiment_name
    from lmadda.study.tracking import read_study

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "document": str(tmp_path / "docs" / "study.md"),
                                      "figures": str(tmp_path / "docs" / "study"), **_config()}))
    assert main(["study", "--config", str(config)]) == 0
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    models, profiles, artifacts, facts = read_study(uri, experiment_name(build_config(StudyConfig, config).experiments[0]))
    methods = {(m["target"], m["method"]) for m in models}
    for target in ("phase_contrast+overexposure:3", "bright_field"):
        assert {(target, m) for m in ("unadapted", "adabn", "histogram_matching", "fda", "lmadda", "adda", "lmadda_multi", "oracle")} <= methods
    adapted = [m for m in models if m["method"] in ("lmadda", "adda")]
    assert len(adapted) == 2 * 4 * 2  # targets x layers x seeds
    paper = [m for m in models if m["method"] == "adda_paper"]
    assert len(paper) == 2 * 2 and all(m["g_updates"] == 2 for m in paper)  # ADDA as published: G' steps every step
    choices = [m for m in models if m["method"] == "label_free"]
    assert sorted((m["target"], m["seed"]) for m in choices) == sorted((t, s) for t in ("phase_contrast+overexposure:3", "bright_field")
                                                                         for s in (0, 1))
    assert all(m["fell_back"] in (0.0, 1.0) and m["matched"] for m in choices)
    assert all(m["g_updates"] == int(m["g_updates"]) and 0 <= m["g_updates"] <= 6 for m in adapted)  # G' steps, logged per model
    assert all(np.isfinite(m["lf_output_w1"]) and np.isfinite(m["lf_seed_disagreement"]) and np.isfinite(m["lf_layer_disagreement"]) for m in adapted)
    assert {p["target"] for p in profiles} == {"phase_contrast+overexposure:3", "bright_field"}
    assert all(len(p["profile"]) == 12 and 0 <= p["predicted_layer"] < 12 for p in profiles)
    assert len(list((artifacts / "panels").glob("*.png"))) == 2

    document = (tmp_path / "docs" / "study.md").read_text()
    for heading in ("### Pearson by method", "### Pearson by matched layer", "### Single-layer vs multi-layer matching",
                    "### Choosing the layer without target labels", "### What held up", "(published baseline)",
                    "### Did the adapted generator move?"):
        assert heading in document
    figures = {p.name for p in (tmp_path / "docs" / "study").glob("*.png")}
    assert {"tiny_pearson_by_layer.png", "tiny_criteria.png", "tiny_profiles.png"} <= figures
    for name in figures:
        assert f"study/{name}" in document

    before = len(models)
    (tmp_path / "docs" / "study.md").unlink()
    assert main(["study", "--config", str(config)]) == 0  # everything done: nothing is adapted or logged again
    assert len(read_study(uri, "lmadda-study-tiny")[0]) == before
    assert (tmp_path / "docs" / "study.md").exists()
    assert main(["study", "--config", str(config), "--rechoose"]) == 0  # choices made again from the kept observations
    again = read_study(uri, "lmadda-study-tiny")[0]
    assert len(again) == before and sorted(m["seed"] for m in again if m["method"] == "label_free") == [0, 0, 1, 1]
    assert main(["study", "--config", str(config), "--only", "nope"]) == 2
    assert "no such experiment" in capsys.readouterr().err


def test_the_oracle_starts_from_the_source_weights_and_refuses_another_architecture(tiny_synth, tiny_source, tmp_path):
    import torch

    from lmadda.checkpoint import load_checkpoint
    from lmadda.training.source import SourceTrainConfig, train_source

    base = dict(manifest=tiny_synth.source, markers=["dapi", "cd29"], ndf=4, crop_size=64, batch_size=2, epochs=1,
                crops_per_epoch=2, device="cpu", init_from=tiny_source)
    result = train_source(SourceTrainConfig(**base, ngf=4, depth=6, lr=1e-12), progress=False)
    start = load_checkpoint(tiny_source).generator.state_dict()
    for name, tensor in result.checkpoint.generator.state_dict().items():
        if tensor.is_floating_point() and "running" not in name:
            torch.testing.assert_close(tensor, start[name], atol=1e-6, rtol=0)
    with pytest.raises(LmaddaError, match="set ngf/depth/markers to match it"):
        train_source(SourceTrainConfig(**base, ngf=8, depth=6), progress=False)


def test_result_table_keeps_criterion_columns_that_the_first_rows_lack(tmp_path):
    from lmadda.study.grid import ResultTable

    path = tmp_path / "results.parquet"
    table = ResultTable(path)
    table.add([{"target": "t", "method": "unadapted", "layer": -1, "seed": 0, "pearson": 0.5}])
    table.add([{"target": "t", "method": "lmadda", "layer": 3, "seed": 0, "pearson": 0.6, "lf_output_w1": 0.1}])
    again = ResultTable(path).rows
    assert again[1]["lf_output_w1"] == pytest.approx(0.1) and again[0]["lf_output_w1"] is None


def test_a_model_whose_generator_never_moved_is_marked_and_unknown_counts_are_not():
    from lmadda.study.results import Results, never_moved
    from lmadda.study.tables import layer_table, movement_table

    def model(layer, seed, g_updates):
        run = {"target": "t", "shift": "none", "magnitude": float("nan"), "method": "adda" if layer == 15 else "lmadda",
               "layer": layer, "matched": str(layer), "lr": 2e-5, "seed": seed, "pearson": 0.5 + layer / 100, "collapsed": False}
        return run if g_updates is None else {**run, "g_updates": float(g_updates)}

    assert never_moved([model(15, 0, 0), model(15, 1, 0)])
    assert not never_moved([model(15, 0, 0), model(15, 1, 3)])
    assert not never_moved([model(15, 0, None)])  # logged before the counter existed: unknown, not unmoved
    results = Results([model(layer, seed, 0 if layer == 15 else 7) for layer in (0, 3, 7, 15) for seed in (0, 1)]
                      + [{**model(-1, 0, None), "method": "unadapted"}], [])
    assert "| t | 2e-05 | 6 of 8 | 7 | 15 |" in movement_table(results)
    rows = {line.split(" | ")[0]: line for line in layer_table(results)}
    assert rows["| 15"].endswith("° |") or "°**" in rows["| 15"]
    assert "°" not in rows["| 3"]
    assert movement_table(Results([model(3, 0, None)], [])) == []


def _model(target, method, pearson, seed=0, layer=-1, lr=None, **extra):
    return {"target": target, "method": method, "pearson": pearson, "seed": seed, "layer": layer, "lr": lr, **extra}


def test_the_summary_scores_the_label_free_choice_against_the_bars_the_issue_set():
    from lmadda.study.analysis import bars, summary_records
    from lmadda.study.document import bars_lines

    models = []
    for target, unadapted, cheap, chosen, oracle in [("a", 0.10, 0.30, 0.40, 0.50),   # recovers 75 %, beats the cheap ones
                                                     ("b", 0.20, 0.50, 0.35, 0.60),   # 37 %, below histogram matching
                                                     ("c", 0.70, 0.69, 0.70, 0.72)]:  # oracle gap < 0.05: not judged
        models += [_model(target, "unadapted", unadapted), _model(target, "histogram_matching", cheap), _model(target, "oracle", oracle),
                   _model(target, "adda_paper", unadapted, layer=15, lr=2e-4), _model(target, "lmadda", chosen, layer=1, lr=2e-5)]
        models += [_model(target, "label_free", chosen, seed=s, layer=1, lr=2e-5, matched="lmadda:1@2e-05", fell_back=0.0) for s in (0, 1, 2)]
    records = {r["target"]: r for r in summary_records("x", models)}
    assert records["a"]["gap_recovered_label_free"] == 0.75 and records["c"]["gap_recovered_label_free"] is None
    assert records["a"]["label_free"] == {"method": "lmadda", "layer": 1, "pearson": 0.4, "fell_back": False,
                                          "choices": ["lmadda:1@2e-05"] * 3}
    assert records["b"]["best_labelled"] == {"method": "histogram_matching", "layer": -1, "pearson": 0.5}
    assert records["a"]["adda"] == 0.1 and records["a"]["histogram"] == 0.3
    judged = bars(list(records.values()))
    assert (judged.gapped, judged.scored) == (2, 3)
    assert (judged.recovery.passed, judged.recovery.need, judged.recovery.met, judged.recovery.failing) == (1, 2, False, ("x/b",))
    assert judged.harm.met and judged.harm.failing == ()
    assert judged.ceilings == {"x/b": pytest.approx(0.75)} and judged.beyond_reach == []
    lines = "\n".join(bars_lines(judged))
    assert "oracle gap of at least 0.05: 2 of 3" in lines
    assert "Recovers at least 60% of the gap: 1 of 2 (bar: 2) — **not met**; not on x/b" in lines
    assert "Worse than the unadapted model by more than 0.01: 0 of 2 (bar: 0) — met" in lines
    # b's best model with labels (histogram matching, 0.50) recovers 75 %: the choice, not the adaptation, fell short
    assert "Even the best single model chosen with test labels recovers 75% on x/b." in lines
    assert "No candidate gets there" not in lines
    weak = {**records["b"], "best_labelled": {"method": "lmadda", "layer": 1, "pearson": 0.35}}
    assert bars([records["a"], weak]).beyond_reach == ["x/b"]
    assert "No candidate gets there, so no label-free rule" in "\n".join(bars_lines(bars([records["a"], weak])))


def test_findings_say_when_adda_never_moved_and_when_the_oracle_is_no_upper_bound():
    from lmadda.study.analysis import findings
    from lmadda.study.document import findings_lines
    from lmadda.study.results import Results

    def run(method, layer, pearson, seed=0, g_updates=None):
        row = {"target": "t", "shift": "defocus", "magnitude": float("nan"), "method": method, "layer": layer,
               "matched": str(layer), "lr": 2e-5 if layer >= 0 else float("nan"), "seed": seed, "pearson": pearson, "collapsed": False}
        return row if g_updates is None else {**row, "g_updates": float(g_updates)}

    models = [run("unadapted", -1, 0.5), run("oracle", -1, 0.4),
              *(run("adda", 15, 0.5, seed, 0) for seed in (0, 1)),
              *(run("lmadda", 3, 0.7, seed, 12) for seed in (0, 1))]
    found = findings(Results(models, []), {}, {})
    assert found.adda_never_moved == ["t"] and found.oracle_below == [("t", 0.4, 0.5)]
    assert found.claim("best_layer_beats_adda").held == ["t"] and found.claim("adda_beats_unadapted").held == []
    text = "\n".join(findings_lines(found))
    assert "In 1 of 1 targets ADDA's G' never moved" in text
    assert "The oracle scores below the unadapted model on 1 target(s) (t: 0.400 vs 0.500)" in text
    assert "beats ADDA: **1 of 1 targets**" in text


def _prepared_experiment(tmp_path, tiny_synth, tiny_source, **changes):
    """A study config whose data and source model already exist in its out folder (nothing is trained)."""
    import shutil

    config = build_config(StudyConfig, None, out=str(tmp_path / "out"), document=str(tmp_path / "docs" / "lab.md"),
                          figures=str(tmp_path / "docs" / "lab"), title="Our lab's adaptation study",
                          **_config(**changes)).resolved(tmp_path)
    out = config.out / "tiny"
    tiny_synth.save(out / "data" / "manifest.parquet")
    (out / "models").mkdir(parents=True)
    shutil.copyfile(tiny_source, out / "models" / "source.pt")
    return config


def test_a_failing_target_is_recorded_with_its_reason_and_the_study_and_its_document_go_on(tiny_synth, tiny_source, tmp_path, monkeypatch):
    import json

    import lmadda.study.runner as runner
    from lmadda.study.document import write_study_document

    config = _prepared_experiment(tmp_path, tiny_synth, tiny_source, oracle=None,
                                  grids=[{"targets": ["phase_contrast+overexposure:3", "bright_field"], "layers": [0], "seeds": [0, 1]}])
    studied = []

    def run_grid(source, data, domains, *args, **kwargs):
        studied.append((domains[0].name, kwargs.get("oracle")))
        if domains[0].name == "bright_field":
            raise LmaddaError("bright_field: the camera was off")
        return []

    monkeypatch.setattr(runner, "run_grid", run_grid)
    logged = []
    runner.run_experiment(config.experiments[0], config, log=logged.append)
    assert [name for name, _ in studied] == ["phase_contrast+overexposure:3", "bright_field", "phase_contrast+overexposure:3"]
    failures = json.loads((config.out / "tiny" / "failures.json").read_text())
    assert failures == [{"target": "bright_field", "stage": "adapting (seed 0, lr 2e-05)", "error": "LmaddaError: bright_field: the camera was off"}]
    assert any("bright_field failed while adapting" in line for line in logged)
    assert "failed targets: bright_field" in logged[-1]

    document = write_study_document(config, "lab/study.yaml").read_text()
    assert document.startswith("# Our lab's adaptation study\n")
    assert "`lmadda study --config lab/study.yaml`" in document and "docs/study.yaml" not in document
    assert "### Failed targets" in document and "| bright_field | adapting (seed 0, lr 2e-05) | LmaddaError: bright_field: the camera was off |" in document

    monkeypatch.setattr(runner, "run_grid", lambda *args, **kwargs: [])
    runner.run_experiment(config.experiments[0], config, log=logged.append)  # a rerun retries the target, and it works now
    assert not (config.out / "tiny" / "failures.json").exists()


def test_source_training_in_the_study_logs_each_epoch(tiny_synth, tmp_path):
    from lmadda.study.grid import ImageSource
    from lmadda.study.runner import prepare_source

    spec = build_config(StudyConfig, None, **_config()).experiments[0]
    logged = []
    prepare_source(spec, ImageSource(tiny_synth), tiny_synth.source, tmp_path, log=logged.append)
    assert any("source epoch 1/1: g_l1" in line and "validation Pearson" in line for line in logged)


def test_indexed_data_is_checked_for_settings_and_crop_sizes_before_any_training(tmp_path):
    from lmadda.data.io import write_tiff
    from lmadda.study.runner import prepare_manifest

    for field in ("w0", "w1", "w2"):
        for channel in ("phase", "dapi"):
            write_tiff(tmp_path / "images" / f"{field}_{channel}.tif", np.ones((48, 64)), dtype="uint16")
    index = {"root": str(tmp_path / "images"), "patterns": [r"(?P<field>w\d)_(?P<channel>[a-z]+)\.tif$"], "targets": {"dapi": "dapi"},
             "rename": {"phase": "phase_contrast"}, "bit_depth": 12}
    spec = build_config(StudyConfig, None, **_config(data={"index": index}, oracle=None,
                                                     grids=[{"targets": ["phase_contrast+overexposure:2"]}])).experiments[0]
    with pytest.raises(LmaddaError, match=r"the height of the source is 48 px \(the smallest image in .*: 48 x 64 px\), fewer than "
                                          r"source.train.crop_size 64; larger images"):
        prepare_manifest(spec, tmp_path / "out")
    bad = build_config(StudyConfig, None, **_config(data={"index": index}, grids=[{"targets": ["bright_field"]}])).experiments[0]
    with pytest.raises(LmaddaError, match=r"setting\(s\) bright_field not in the indexed data.*its settings: phase_contrast"):
        prepare_manifest(bad, tmp_path / "out")
    from lmadda.data.manifest import Manifest

    for field in ("w0", "w1", "w2"):
        for channel in ("phase", "dapi"):
            write_tiff(tmp_path / "images" / f"{field}_{channel}.tif", np.ones((64, 64)), dtype="uint16")
    manifest = Manifest.load(prepare_manifest(spec, tmp_path / "out"))
    assert {r.bit_depth for r in manifest.rows} == {12}


@pytest.mark.slow
def test_study_runs_every_family_and_the_robust_source_as_candidates_of_the_one_choice(tmp_path, capsys):
    from lmadda.checkpoint import load_checkpoint
    from lmadda.study.runner import experiment_name
    from lmadda.study.tracking import read_study

    experiment = {**EXPERIMENT, "grids": [{"targets": ["phase_contrast+overexposure:3"], "layers": [2], "paper_layers": [], "seeds": [0],
                                           "families": ["lmadda", "moments", "self_training", "histogram_matching+self_training"],
                                           "family_layers": [2]}],
                  "baselines": ["adabn", "histogram_matching", "fda", "adabn:2", "histogram_matching+adabn:2"],
                  "robust": {"epochs": 1, "crops_per_epoch": 4, "augment": {"copies": 1, "min_size": 64}}}
    experiment.pop("oracle")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "document": str(tmp_path / "docs" / "study.md"),
                                      "figures": str(tmp_path / "docs" / "study"), "experiments": [experiment]}))
    assert main(["study", "--config", str(config)]) == 0
    models = read_study(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", experiment_name(build_config(StudyConfig, config).experiments[0]))[0]
    target = "phase_contrast+overexposure:3"
    methods = {m["method"] for m in models if m["target"] == target}
    assert {"moments", "self_training", "histogram_matching+self_training", "lmadda", "adabn:2", "histogram_matching+adabn:2",
            "robust", "robust+adabn", "robust+histogram_matching", "label_free"} <= methods
    assert {m["method"] for m in models if m["target"] == "source"} == {"unadapted", "robust"}
    observed = {p.stem for p in (tmp_path / "out" / "tiny" / "selection" / "phase_contrast+overexposure_3" / "seed0").glob("*.npz")}
    assert {"unadapted", "adabn:2", "moments:2@0.0001", "self_training:2@0.0001",
            "histogram_matching+self_training:2@0.0001", "lmadda:2@2e-05"} <= observed
    assert "fda" not in observed  # needs source images at run time: reported, never chosen
    assert (tmp_path / "out" / "tiny" / "models" / "source_robust.pt").is_file()
    summary = json.loads((tmp_path / "docs" / "study" / "summary.json").read_text())
    record = next(r for r in summary if r["target"] == target)
    assert {"moments", "self_training", "lmadda", "adabn", "robust", "robust+adabn"} <= set(record["families"])
    assert record["best_family"] in record["families"] and record["covered"] is True  # overexposure x3 lies in the default gain range
    assert record["robust_in_domain_cost"] is not None
    admission = record["robust_admission"]  # measured on the source's validation fields; decides what the selector sees
    assert admission["admitted"] == (admission["robust"] >= admission["plain"] - 0.01)
    robust_observed = {"robust", "robust+adabn", "robust+histogram_matching"} & observed
    assert robust_observed == ({"robust", "robust+adabn", "robust+histogram_matching"} if admission["admitted"] else set())
    assert "### Who wins where: every family" in (tmp_path / "docs" / "study.md").read_text()

    # The robust config changes: the old model is not silently reused; --retrain-robust sets it aside and measures again.
    models_dir = tmp_path / "out" / "tiny" / "models"
    before = {m["method"]: 0 for m in models}
    for m in models:
        before[m["method"]] += 1
    experiment["robust"]["augment"]["copies"] = 2
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "document": str(tmp_path / "docs" / "study.md"),
                                      "figures": str(tmp_path / "docs" / "study"), "experiments": [experiment]}))
    capsys.readouterr()
    assert main(["study", "--config", str(config)]) == 2
    refusal = capsys.readouterr().err
    assert "augment.copies: 1 -> 2" in refusal and "lmadda study --retrain-robust --only tiny" in refusal
    old_model = (models_dir / "source_robust.pt").read_bytes()
    assert main(["study", "--config", str(config), "--retrain-robust"]) == 0
    assert (models_dir / "source_robust.replaced-1.pt").read_bytes() == old_model  # kept, not lost
    assert load_checkpoint(models_dir / "source_robust.pt").metadata["train_config"]["augment"]["copies"] == 2
    again = read_study(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "lmadda-study-tiny")[0]
    after = {m["method"]: 0 for m in again}
    for m in again:
        after[m["method"]] += 1
    assert after == before  # the robust rows and the choices measured again, once each; nothing else adapted again
    in_domain = {(m["method"], run): m["pearson"] for run, record in (("before", models), ("after", again))
                 for m in record if m["target"] == "source"}
    assert in_domain["unadapted", "after"] == in_domain["unadapted", "before"]
    assert in_domain["robust", "after"] != in_domain["robust", "before"]  # the new model's own figure


@pytest.mark.slow
def test_a_refused_robust_model_is_replaced_by_its_second_try_whose_rows_the_study_measures(tmp_path, monkeypatch, capsys):
    import lmadda.training.robust as robust_module
    from lmadda.checkpoint import load_checkpoint
    from lmadda.data.manifest import Manifest
    from lmadda.evaluation.evaluate import evaluate_generator
    from lmadda.study.analysis import Bar, Bars
    from lmadda.study.document import bars_lines
    from lmadda.study.grid import ImageSource, ResultTable
    from lmadda.training.robust import RECOGNISABLE, RobustAdmission

    real, verdicts, refuse_first = robust_module.admit_robust, [], []

    def admission_as_told(plain, robust, validation, markers):  # whatever the tiny models score, the test decides
        measured = real(plain, robust, validation, markers)
        verdicts.append(measured)  # cleared before each run: the first verdict of a run is the first try's
        if refuse_first and len(verdicts) == 1:
            return RobustAdmission(measured.plain_validation, measured.plain_validation - 0.5)
        return RobustAdmission(measured.plain_validation, measured.plain_validation)  # admitted

    monkeypatch.setattr(robust_module, "admit_robust", admission_as_told)
    experiment = {**EXPERIMENT, "grids": [{"targets": ["phase_contrast+overexposure:3"], "layers": [2], "paper_layers": [], "seeds": [0]}],
                  "baselines": ["adabn"], "robust": {"epochs": 1, "crops_per_epoch": 4, "augment": {"copies": 1, "min_size": 64}}}
    experiment.pop("oracle")
    config = tmp_path / "study.yaml"

    def write_config() -> None:
        config.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "document": str(tmp_path / "docs" / "study.md"),
                                          "figures": str(tmp_path / "docs" / "study"), "experiments": [experiment]}))

    write_config()
    out, models = tmp_path / "out" / "tiny", tmp_path / "out" / "tiny" / "models"
    assert main(["study", "--config", str(config)]) == 0  # the first try admitted: its rows are measured
    assert not (models / "source_robust_second_try.pt").exists()
    # Now the first try is refused: a plain rerun would add a second try beside the first try's rows. Refused.
    refuse_first.append(True)
    verdicts.clear()
    capsys.readouterr()
    assert main(["study", "--config", str(config)]) == 1  # the experiment fails with the reason; the study goes on
    said = capsys.readouterr()
    assert "were measured with source_robust.pt" in said.out + said.err and "--retrain-robust --only tiny" in said.out + said.err
    verdicts.clear()
    assert main(["study", "--config", str(config), "--retrain-robust"]) == 0
    # both set aside: the first try, and the second try the refused run had trained
    assert {p.name for p in models.glob("*.replaced-1.pt")} == {"source_robust.replaced-1.pt", "source_robust_second_try.replaced-1.pt"}
    assert (models / "source_robust.pt").is_file()  # the refused first try, trained again, is kept
    second = load_checkpoint(models / "source_robust_second_try.pt")
    assert second.metadata["train_config"]["augment"]["min_similarity"] == RECOGNISABLE
    record = json.loads((tmp_path / "docs" / "study" / "summary.json").read_text())[0]
    assert record["robust_admission"]["second_try"] is True
    # the robust rows are the second try's: its in-domain row is its own Pearson on the source's test fields
    data = ImageSource(Manifest.load(out / "data" / "manifest.parquet"))
    test_fields = data.load("phase_contrast", "test", second.markers, percentiles=second.percentiles)
    own = np.nanmean([r["pearson"] for r in evaluate_generator(second.generator, test_fields, second.markers)])
    rows = [r["pearson"] for r in ResultTable(out / "results.parquet").rows if r["target"] == "source" and r["method"] == "robust"]
    assert np.nanmean(rows) == pytest.approx(own, abs=1e-6)
    judged = Bars(scored=1, gapped=1, recovery=Bar(1, 1, 1), as_good_as_cheap=Bar(1, 1, 1), harm=Bar(1, 1, 0),
                  robust_cost={"tiny": 0.0}, robust_admission={"tiny": record["robust_admission"]})
    assert "this is the second try, recognisable copies only, after the first was refused" in "\n".join(bars_lines(judged))
    # A lab that already keeps only recognisable copies has no second try: the refused model stays, reported.
    experiment["robust"]["augment"]["min_similarity"] = 0.6
    write_config()
    verdicts.clear()
    capsys.readouterr()
    assert main(["study", "--config", str(config), "--retrain-robust"]) == 0
    assert "narrow its ranges" in capsys.readouterr().out
    assert not (models / "source_robust_second_try.pt").exists()
    record = json.loads((tmp_path / "docs" / "study" / "summary.json").read_text())[0]
    assert record["robust_admission"]["second_try"] is False and record["robust_admission"]["admitted"] is False


def test_the_documents_commit_is_lmaddas_not_the_working_directorys(tmp_path, monkeypatch):
    import shutil
    import subprocess
    from pathlib import Path

    from lmadda.study.document import _git_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    lab = tmp_path / "lab"  # a lab running `lmadda study` inside its own repository
    lab.mkdir()
    subprocess.run(["git", "init", "-q", str(lab)], check=True)
    subprocess.run(["git", "-C", str(lab), "-c", "user.name=Lab", "-c", "user.email=lab@example.org", "commit", "-q",
                    "--allow-empty", "-m", "the lab's work"], check=True)
    labs = subprocess.run(["git", "-C", str(lab), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(lab)
    checkout = Path(__file__).resolve().parents[1]
    ours = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert _git_commit() != labs
    assert _git_commit() == (ours.stdout.strip() if ours.returncode == 0 else "unknown")
