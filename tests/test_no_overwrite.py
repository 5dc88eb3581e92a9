"""No command writes over one of its own inputs (issue 26, hole 6): an output that is an input, through a symbolic or
a hard link too, is refused in one line before any work, and the input keeps its bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
from lmadda.cli import main
from lmadda.core.errors import LmaddaError
from lmadda.data.io import write_tiff
from lmadda.data.manifest import Manifest
from lmadda.models import GeneratorConfig, UNetGenerator


def _model(path: Path, markers=("dapi", "cd29")) -> Path:
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3, out_channels=len(markers))).eval()
    return save_checkpoint(path, GeneratorCheckpoint(generator=generator, markers=list(markers), setting="phase_contrast"))


@pytest.fixture
def image(tmp_path) -> Path:
    return write_tiff(tmp_path / "x.tif", np.random.default_rng(0).integers(0, 4095, size=(40, 48)), dtype="uint16")


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(part) for part in argv])
    return code, capsys.readouterr().err


def _one_line_error(error: str) -> str:
    lines = error.strip().splitlines()
    assert lines and lines[-1].startswith("lmadda: error: "), error
    assert "Traceback" not in error
    return lines[-1]


# ---- the rule ------------------------------------------------------------------------------------------------------

def test_the_rule_refuses_the_same_file_by_name_symlink_and_hard_link_and_a_folder_holding_the_input(tmp_path, image):
    from lmadda.data.io import refuse_overwriting_inputs

    os.symlink(image, tmp_path / "soft.tif")
    os.link(image, tmp_path / "hard.tif")
    for out in (image, tmp_path / "." / "x.tif", tmp_path / "soft.tif", tmp_path / "hard.tif", tmp_path):
        with pytest.raises(LmaddaError, match="would overwrite the input IN") as caught:
            refuse_overwriting_inputs([("--out", out)], [("IN", image)])
        assert str(out) in str(caught.value) and "choose another --out" in str(caught.value)
    refuse_overwriting_inputs([("--out", tmp_path / "y.tif"), ("--out", tmp_path / "new" / "x.tif")], [("IN", image), ("--config", None)])


# ---- predict -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_predict_refuses_to_write_its_stain_over_its_input_image(tmp_path, image, capsys, how):
    model = _model(tmp_path / "model.pt")
    out = image
    if how == "symlink":
        out = tmp_path / "link.tif"
        os.symlink(image, out)
    elif how == "hard link":
        out = tmp_path / "hard.tif"
        os.link(image, out)
    before = image.read_bytes()
    code, error = _run(["predict", model, image, out, "--tile", "32", "--device", "cpu"], capsys)
    assert code == 2
    line = _one_line_error(error)
    assert f"{out} would overwrite the input IN {image}" in line and "choose another OUT" in line
    assert image.read_bytes() == before
    assert out.is_symlink() == (how == "symlink")


def test_predict_refuses_to_write_over_its_checkpoint(tmp_path, image, capsys):
    model = _model(tmp_path / "model.tif")  # a checkpoint is a checkpoint whatever its name
    before = model.read_bytes()
    code, error = _run(["predict", model, image, model, "--tile", "32", "--device", "cpu"], capsys)
    assert code == 2
    assert "would overwrite the input CHECKPOINT" in _one_line_error(error)
    assert model.read_bytes() == before


# ---- other commands ------------------------------------------------------------------------------------------------

@pytest.fixture
def manifest(tiny_synth, tmp_path) -> Path:
    """A copy of the tiny simulated manifest (its images stay where they are): a failing test cannot spoil the session's."""
    return tiny_synth.save(tmp_path / "manifest.parquet")


def test_evaluate_overwrite_does_not_replace_its_manifest(tmp_path, manifest, capsys):
    model = _model(tmp_path / "model.pt")
    before = manifest.read_bytes()
    code, error = _run(["evaluate", model, "--manifest", manifest, "--setting", "phase_contrast", "--out", manifest,
                        "--overwrite", "--device", "cpu"], capsys)
    assert code == 2
    assert f"--out {manifest} would overwrite the input --manifest {manifest}" in _one_line_error(error)
    assert manifest.read_bytes() == before


def test_data_show_does_not_draw_its_contact_sheet_over_one_of_the_manifests_images(manifest, capsys):
    loaded = Manifest.load(manifest)
    victim = loaded.resolve(loaded.rows[0])
    before = victim.read_bytes()
    code, error = _run(["data", "show", manifest, "--png", victim], capsys)
    assert code == 2
    assert f"would overwrite the input an image of MANIFEST {victim}" in _one_line_error(error)
    assert victim.read_bytes() == before


def test_data_index_does_not_write_its_manifest_through_a_link_to_an_image_it_indexed(tmp_path, capsys):
    folder = tmp_path / "images"
    for channel in ("phase", "dapi"):
        write_tiff(folder / f"f1_{channel}.tif", np.full((16, 16), 7), dtype="uint16")
    victim = folder / "f1_phase.tif"
    before = victim.read_bytes()
    out = tmp_path / "manifest.parquet"
    os.symlink(victim, out)
    code, error = _run(["data", "index", folder, "--pattern", r"(?P<field>\w+?)_(?P<channel>\w+)\.tif", "--target", "dapi=dapi",
                        "--split", "f1=train", "--out", out], capsys)
    assert code == 2
    assert f"--out {out} would overwrite the input an image of DIR {victim}" in _one_line_error(error)
    assert victim.read_bytes() == before


def test_train_source_does_not_replace_the_checkpoint_it_starts_from(tmp_path, manifest, capsys):
    model = _model(tmp_path / "model.pt")
    before = model.read_bytes()
    code, error = _run(["train-source", "--manifest", manifest, "--markers", "dapi,cd29", "--init-from", model, "--out", model, "--ngf", "4", "--ndf", "4", "--depth", "3",
                        "--epochs", "1", "--crops-per-epoch", "2", "--crop-size", "32", "--batch-size", "2", "--device", "cpu"], capsys)
    assert code == 2
    assert f"--out {model} would overwrite the input --init-from {model}" in _one_line_error(error)
    assert model.read_bytes() == before


def test_stain_does_not_write_the_servers_answer_over_the_image_it_sends(image, capsys):
    before = image.read_bytes()
    code, error = _run(["stain", image, "--setting", "phase_contrast", "-o", image, "--url", "http://127.0.0.1:9"], capsys)
    assert code == 2
    assert f"--out {image} would overwrite the input IMAGE {image}" in _one_line_error(error)
    assert image.read_bytes() == before
