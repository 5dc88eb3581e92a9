"""`lmadda predict OUT`: the format OUT's extension names, a clear refusal otherwise, and never a `.partial` left behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
from lmadda.cli import main
from lmadda.core.errors import LmaddaError
from lmadda.data.io import read_image, write_image, write_tiff
from lmadda.models import GeneratorConfig, UNetGenerator

PNG_MAGIC, TIFF_MAGIC = b"\x89PNG", (b"II*\x00", b"MM\x00*")


def _model(folder, markers: list[str]):
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3, out_channels=len(markers))).eval()
    return save_checkpoint(folder / f"{len(markers)}-marker.pt", GeneratorCheckpoint(generator=generator, markers=markers, setting="phase_contrast"))


@pytest.fixture
def image(tmp_path):
    return write_tiff(tmp_path / "in.tif", np.random.default_rng(0).integers(0, 4095, size=(40, 48)), dtype="uint16")


def _predict(model, image, out, capsys) -> tuple[int, str]:
    code = main(["predict", str(model), str(image), str(out), "--tile", "32", "--device", "cpu"])
    return code, capsys.readouterr().err


def _partials(folder) -> list:
    return list(folder.rglob(".*.partial"))


def test_a_png_out_is_a_png_with_the_same_pixels_as_the_tiff(tmp_path, image, capsys):
    model = _model(tmp_path, ["dapi"])
    assert _predict(model, image, tmp_path / "stain.png", capsys)[0] == 0
    assert _predict(model, image, tmp_path / "stain.tif", capsys)[0] == 0
    assert (tmp_path / "stain.png").read_bytes()[:4] == PNG_MAGIC
    assert (tmp_path / "stain.tif").read_bytes()[:4] in TIFF_MAGIC
    png, tiff = read_image(tmp_path / "stain.png"), read_image(tmp_path / "stain.tif")
    assert png.dtype == tiff.dtype == "uint16"
    np.testing.assert_array_equal(png.pixels, tiff.pixels)


@pytest.mark.parametrize("out, message", [
    ("folder", "folder is a folder; name the output image file"),
    ("stain.jpg", "cannot write .jpg; lmadda writes .tif, .tiff, .png"),
    ("stain.png", "a PNG holds one grey channel, and this image has 2 (one per marker); write a .tif"),
    ("in.tif/stain.tif", "in.tif is a file, not a folder"),
])
def test_an_out_that_cannot_be_written_is_refused_in_one_line_and_leaves_nothing(tmp_path, image, capsys, out, message):
    (tmp_path / "folder").mkdir()
    before = sorted(tmp_path.rglob("*"))
    code, error = _predict(_model(tmp_path, ["dapi", "cd29"]), image, tmp_path / out, capsys)
    assert code == 2
    assert [line for line in error.splitlines() if line.startswith("lmadda: error:")] == [error.strip().splitlines()[-1]]
    assert message in error
    assert sorted(p for p in tmp_path.rglob("*") if p.suffix != ".pt") == [p for p in before if p.suffix != ".pt"]
    assert not _partials(tmp_path)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
@pytest.mark.parametrize("name", ["stain.tif", "stain.png"])
def test_a_write_that_fails_half_way_leaves_no_partial_and_the_old_image_intact(tmp_path, monkeypatch, failure, name):
    import tifffile
    from PIL import Image

    out = write_image(tmp_path / name, np.ones((8, 8)), dtype="uint16")
    kept = out.read_bytes()

    def half_written(target, *args, **kwargs):
        open(target, "wb").write(b"half an image")
        raise failure

    monkeypatch.setattr(tifffile, "imwrite", half_written)
    monkeypatch.setattr(Image.Image, "save", lambda self, target, *args, **kwargs: half_written(target))
    with pytest.raises(LmaddaError if isinstance(failure, OSError) else KeyboardInterrupt):
        write_image(out, np.zeros((8, 8)), dtype="uint16")
    assert not _partials(tmp_path)
    assert out.read_bytes() == kept


def test_a_png_holds_integers_only(tmp_path):
    with pytest.raises(LmaddaError, match="a PNG holds 8- or 16-bit integers, and this image is float32; write a .tif"):
        write_image(tmp_path / "x.png", np.zeros((4, 4)), dtype="float32")
