"""A tiny source -> adapt -> evaluate -> report -> predict run on simulated data, through the CLI."""

import pyarrow.parquet as pq
import pytest
import yaml

from lmadda.cli import main
from lmadda.data.io import read_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_model(tiny_synth, tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    config = folder / "source.yaml"
    config.write_text(yaml.safe_dump({
        "manifest": str(tiny_synth.source), "setting": "phase_contrast", "markers": ["dapi", "cd29"],
        "ngf": 4, "depth": 6, "ndf": 4, "crop_size": 64, "batch_size": 2, "epochs": 2, "crops_per_epoch": 4, "device": "cpu",
    }))
    assert main(["train-source", "--config", str(config), "--out", str(folder / "source.pt")]) == 0
    return folder, folder / "source.pt"


def test_source_adapt_evaluate_report_predict(tiny_synth, source_model, capsys):
    folder, source = source_model
    adapt_config = folder / "adapt.yaml"
    adapt_config.write_text(yaml.safe_dump({"steps": 3, "batch_size": 2, "crop_size": 64, "device": "cpu"}))
    adapted = folder / "adapted.pt"
    assert main(["adapt", str(source), "--manifest", str(tiny_synth.source), "--setting", "bright_field",
                 "--layer", "4", "--config", str(adapt_config), "--out", str(adapted)]) == 0
    results = folder / "results.parquet"
    assert main(["evaluate", str(source), str(adapted), "--manifest", str(tiny_synth.source), "--setting", "bright_field",
                 "--baselines", "adabn,histogram_matching,fda", "--out", str(results)]) == 0
    rows = pq.read_table(results).to_pylist()
    assert {r["method"] for r in rows} == {"unadapted", "adabn", "histogram_matching", "fda", "lmadda"}
    assert {r["marker"] for r in rows} == {"dapi", "cd29"}
    assert all(-1 <= r["pearson"] <= 1 for r in rows if r["pearson"] == r["pearson"])
    assert main(["report", str(results), "--out", str(folder / "report")]) == 0
    assert (folder / "report" / "summary.txt").read_text().startswith("pearson")
    assert (folder / "report" / "pearson_by_layer.png").stat().st_size > 5000
    image = tiny_synth.resolve(tiny_synth.inputs("bright_field", "test")[0])
    assert main(["predict", str(adapted), str(image), str(folder / "stain.tif"), "--tile", "64"]) == 0
    assert read_image(folder / "stain.tif").pixels.shape == (2, 64, 64)


def test_adapt_layer_auto_writes_the_label_free_choice_as_a_usable_checkpoint(tiny_synth, source_model, capsys):
    from lmadda.checkpoint import load_checkpoint

    folder, source = source_model
    adapt_config = folder / "auto.yaml"
    adapt_config.write_text(yaml.safe_dump({"steps": 2, "batch_size": 2, "crop_size": 64, "device": "cpu"}))
    chosen = folder / "chosen.pt"
    assert main(["adapt", str(source), "--manifest", str(tiny_synth.source), "--setting", "phase_contrast", "--shift", "overexposure:3",
                 "--layer", "auto", "--config", str(adapt_config), "--out", str(chosen)]) == 0
    out = capsys.readouterr().out
    assert "label-free choice" in out and "output_w1 per candidate" in out
    choice = load_checkpoint(chosen).metadata["label_free_choice"]
    # unadapted, the corrections (AdaBN, histogram matching, AdaBN up to the early cut 3, and both after histogram
    # matching), LM-ADDA at the auto layers of a depth-6 model (0, 1, 2, 3, 5, 8, 11) and the other families at the early cut
    assert set(choice["means"]) == {"unadapted", "adabn", "histogram_matching", "histogram_matching+adabn", "adabn:3",
                                    "histogram_matching+adabn:3", "lmadda:0", "lmadda:1", "lmadda:2", "lmadda:3", "lmadda:5", "lmadda:8",
                                    "adda:11", "moments:3", "self_training:3", "histogram_matching+self_training:3"}
    assert choice["chosen"] in choice["means"] and choice["reason"]
    assert load_checkpoint(chosen).domain_reference is not None  # whatever was chosen, predict can check its domain
    image = tiny_synth.resolve(tiny_synth.inputs("phase_contrast", "test")[0])
    assert main(["predict", str(chosen), str(image), str(folder / "auto_stain.tif"), "--tile", "64"]) == 0
    assert read_image(folder / "auto_stain.tif").pixels.shape == (2, 64, 64)


def test_study_writes_every_method_and_resumes_without_redoing(tiny_synth, source_model):
    from lmadda.checkpoint import load_checkpoint
    from lmadda.evaluation.rows import TargetDomain
    from lmadda.study.config import Grid
    from lmadda.study.grid import run_grid

    folder, source_path = source_model
    source = load_checkpoint(source_path)
    options = {"steps": 2, "batch_size": 2, "crop_size": 64, "device": "cpu"}
    domains = [TargetDomain.parse("bright_field"), TargetDomain.parse("phase_contrast+overexposure:2")]
    grid = Grid(targets=[d.name for d in domains], layers=[0, source.generator.last_layer], paper_layers=[])
    out = folder / "study"
    rows = run_grid(source, tiny_synth, domains, grid.points(source.generator.num_layers), options, seed=0,
                    source_setting="phase_contrast", out=out, progress=False, log=lambda *_: None)
    methods = {(r["target"], r["method"]) for r in rows}
    for domain in ("bright_field", "phase_contrast+overexposure:2"):
        assert {(domain, m) for m in ("unadapted", "adabn", "histogram_matching", "fda", "lmadda", "adda")} <= methods
    before = len(rows)
    again = run_grid(source, tiny_synth, domains, grid.points(source.generator.num_layers), options, seed=0,
                     source_setting="phase_contrast", out=out, progress=False, log=lambda *_: None)
    assert len(again) == before == len(pq.read_table(out / "results.parquet"))


def test_bad_config_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("manifest: m.parquet\nepochz: 3\n")
    assert main(["train-source", "--config", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown option 'epochz'" in capsys.readouterr().err
