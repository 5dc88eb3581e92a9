"""Progress on every long job: `lmadda predict` (tiles), `lmadda evaluate` (checkpoints x images) and source training in
the study report done/total on stderr through the one `Progress` helper (a bar on a terminal, occasional lines in logs)."""

from __future__ import annotations

import numpy as np
import torch

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint, save_checkpoint
from lmadda.cli import main
from lmadda.data.io import write_tiff
from lmadda.models import GeneratorConfig, UNetGenerator
from lmadda.models.tiling import TilePlan


def _progress_lines(err: str, label: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(label)]


def test_tile_batches_report_tiles_done_of_total_and_end_at_the_total(capsys):
    config = GeneratorConfig(ngf=4, depth=3)
    plan = TilePlan(np.zeros((1, 96, 96), np.float32), config, tile=32, overlap=0.25)
    for origins, tiles in plan.batches(2, progress="tiles"):
        plan.add(origins, np.zeros((len(origins), 1, 32, 32), np.float32))
    lines = _progress_lines(capsys.readouterr().err, "tiles")
    total = len(plan.origins)
    assert total > 2 and lines and lines[-1].strip() == f"tiles {total}/{total}"


def test_a_single_batch_of_tiles_shows_no_progress(capsys):
    plan = TilePlan(np.zeros((1, 32, 32), np.float32), GeneratorConfig(ngf=4, depth=3), tile=32)
    list(plan.batches(8, progress="tiles"))
    assert capsys.readouterr().err == ""


def test_predict_on_a_large_image_reports_tiles(tmp_path, capsys):
    torch.manual_seed(0)
    config = GeneratorConfig(ngf=4, depth=3)
    model = save_checkpoint(tmp_path / "model.pt", GeneratorCheckpoint(generator=UNetGenerator(config).eval(), markers=["dapi"],
                                                                       setting="phase_contrast"))
    pixels = np.random.default_rng(0).integers(0, 4095, size=(128, 128))
    image = write_tiff(tmp_path / "big.tif", pixels, dtype="uint16")
    assert main(["predict", str(model), str(image), str(tmp_path / "stain.tif"), "--tile", "32", "--batch-size", "4", "--device", "cpu"]) == 0
    total = len(TilePlan(pixels[None].astype(np.float32), config, tile=32).origins)
    lines = _progress_lines(capsys.readouterr().err, "predict big.tif: tiles")
    assert total > 4 and lines and lines[-1].split()[-1] == f"{total}/{total}"


def test_evaluate_reports_images_over_checkpoints_and_methods(tiny_source, tiny_synth, capsys):
    from lmadda.evaluation.evaluate import evaluate_checkpoints

    checkpoint = load_checkpoint(tiny_source)
    checkpoints = [("a.pt", checkpoint), ("b.pt", checkpoint)]
    evaluate_checkpoints(checkpoints, tiny_synth, "phase_contrast", progress=True, log=lambda line: None)
    fields = len(tiny_synth.pairs("phase_contrast", checkpoint.markers, "test"))
    lines = _progress_lines(capsys.readouterr().err, "evaluate 2 checkpoint(s)")
    assert lines and lines[-1].split()[-1] == f"{2 * fields}/{2 * fields}"


def test_source_training_in_the_study_shows_progress(tiny_synth, tmp_path, monkeypatch):
    # The bar itself is train_source's (`Progress`); the study used to turn it off. Its training is faked here: only
    # whether the study asks for progress is this test's question, and a real one costs tens of seconds.
    import types

    from lmadda.study import runner as study_runner
    from lmadda.core.config import build_config
    from lmadda.study.grid import ImageSource
    from lmadda.study.config import StudyConfig

    asked = {}

    def train_source(config, path, **options):
        asked.update(options)
        return types.SimpleNamespace(best_val_pearson=0.0, seconds=0.0)

    monkeypatch.setattr(study_runner, "train_source", train_source)
    train = {"ngf": 4, "depth": 6, "ndf": 4, "crop_size": 64, "batch_size": 2, "epochs": 1, "crops_per_epoch": 4, "device": "cpu"}
    experiment = {"name": "tiny", "title": "Tiny", "data": {"simulate": {"fields": 12, "size": 64, "seed": 3}},
                  "source": {"setting": "phase_contrast", "markers": ["dapi"], "train": train},
                  "grids": [{"targets": ["bright_field"], "layers": [0]}], "adapt": {"crop_size": 64}, "criteria": {"crop_size": 64}}
    spec = build_config(StudyConfig, None, experiments=[experiment]).experiments[0]
    study_runner.prepare_source(spec, ImageSource(tiny_synth), tiny_synth.source, tmp_path, log=lambda line: None)
    assert asked["progress"] is True
