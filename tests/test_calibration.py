"""Calibration kept: an image's physical pixel size is read from its file, carried onto the prediction, recorded in
the checkpoint at training, and checked against the model's at prediction (`lmadda.data.calibration`)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint, save_checkpoint
from lmadda.cli import main
from lmadda.data import calibration
from lmadda.data.calibration import PixelSize, PixelSizeCheck, check_pixel_size, model_pixel_size
from lmadda.data.io import read_image, read_pixel_size, write_image, write_tiff
from lmadda.data.manifest import setting_pixel_size
from lmadda.data.manifest import Manifest, ManifestRow
from lmadda.data.shifts import Shift
from lmadda.models import GeneratorConfig, UNetGenerator

PIXELS = np.random.default_rng(0).integers(0, 4095, size=(40, 48)).astype(np.uint16)


def _tiny_model(path, pixel_size_um: float | None = None):
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3)).eval()
    metadata = {} if pixel_size_um is None else {"pixel_size_um": pixel_size_um}
    return save_checkpoint(path, GeneratorCheckpoint(generator=generator, markers=["dapi"], setting="phase_contrast", metadata=metadata))


def _pixel_size_lines(err: str) -> list[str]:
    """What `lmadda predict` said about pixel sizes (other notes, such as the domain check's, are not this test's)."""
    return [line for line in err.splitlines() if "µm" in line or "pixel size" in line]


def _resolution_of(path) -> tuple[tuple[float, float], int]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return page.resolution, int(page.resolutionunit)


@pytest.fixture(autouse=True)
def _fresh_once_memory():
    calibration._MODELS_WITHOUT_PIXEL_SIZE.clear()  # "said once" is per process: each test starts unsaid
    yield


# ---- reading what files record --------------------------------------------------------------------------------
def test_ome_tiff_physical_size_is_read_in_micrometres_whatever_its_unit(tmp_path):
    micrometres, nanometres = tmp_path / "um.ome.tif", tmp_path / "nm.ome.tif"
    tifffile.imwrite(micrometres, PIXELS, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.33})
    tifffile.imwrite(nanometres, PIXELS, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 650, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 650, "PhysicalSizeYUnit": "nm"})
    assert read_image(micrometres).pixel_size == PixelSize(0.325, 0.33)
    assert read_image(nanometres).pixel_size.as_list() == pytest.approx([0.65, 0.65])


@pytest.mark.parametrize("unit, per_unit, expected", [("CENTIMETER", 1e4 / 0.65, 0.65), ("INCH", 25400 / 0.2, 0.2)])
def test_plain_tiff_resolution_tags_give_the_pixel_size(tmp_path, unit, per_unit, expected):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, PIXELS, resolution=(per_unit, per_unit), resolutionunit=unit)
    assert read_image(path).pixel_size.x_um == pytest.approx(expected)
    assert read_pixel_size(path).y_um == pytest.approx(expected)  # the header alone, without the pixels


def test_imagej_tiff_pixel_size_uses_its_unit(tmp_path):
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(path, PIXELS, imagej=True, resolution=(1 / 0.16, 1 / 0.16), metadata={"unit": "micron"})
    assert read_image(path).pixel_size.as_list() == pytest.approx([0.16, 0.16])


def test_uncalibrated_tiffs_and_print_resolutions_are_unknown_not_invented(tmp_path):
    default, print_dpi = tmp_path / "default.tif", tmp_path / "72dpi.tif"
    tifffile.imwrite(default, PIXELS)  # tifffile writes resolution 1/1 with unit NONE: an aspect ratio, not a size
    tifffile.imwrite(print_dpi, PIXELS, resolution=(72, 72), resolutionunit="INCH")  # an image editor's default
    assert read_image(default).pixel_size is None
    assert read_image(print_dpi).pixel_size is None


# ---- writing it back ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["out.tif", "out.png"])
def test_written_images_record_the_pixel_size_given(tmp_path, name):
    path = write_image(tmp_path / name, PIXELS, pixel_size=PixelSize(0.65, 0.7))
    assert read_image(path).pixel_size.as_list() == pytest.approx([0.65, 0.7], rel=1e-6)


def test_ome_tiff_written_with_a_pixel_size_records_it_in_the_ome_xml(tmp_path):
    path = write_tiff(tmp_path / "out.ome.tif", PIXELS[None], ome=True, pixel_size=PixelSize(0.325, 0.325))
    with tifffile.TiffFile(path) as tif:
        assert 'PhysicalSizeX="0.325"' in tif.ome_metadata
    assert read_image(path).pixel_size == PixelSize(0.325, 0.325)


# ---- predictions carry the input's pixel size -----------------------------------------------------------------
@pytest.mark.parametrize("ome", [False, True])
def test_predict_writes_the_input_pixel_size_into_the_stain(tmp_path, capsys, ome):
    model = _tiny_model(tmp_path / "model.pt", pixel_size_um=0.65)
    image = tmp_path / ("in.ome.tif" if ome else "in.tif")
    if ome:
        tifffile.imwrite(image, PIXELS, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65})
    else:
        tifffile.imwrite(image, PIXELS, resolution=(1e4 / 0.65, 1e4 / 0.65), resolutionunit="CENTIMETER")
    assert main(["predict", str(model), str(image), str(tmp_path / "stain.tif"), "--tile", "32", "--device", "cpu"]) == 0
    assert _pixel_size_lines(capsys.readouterr().err) == []  # same pixel size as the model's: nothing to say
    resolution, unit = _resolution_of(tmp_path / "stain.tif")
    assert unit == 3 and resolution == pytest.approx((1e4 / 0.65, 1e4 / 0.65))  # pixels per centimetre
    assert read_image(tmp_path / "stain.tif").pixel_size.as_list() == pytest.approx([0.65, 0.65])


def test_predict_pixel_size_option_states_it_for_a_file_that_records_none(tmp_path, capsys):
    model = _tiny_model(tmp_path / "model.pt", pixel_size_um=0.65)
    image = write_tiff(tmp_path / "in.tif", PIXELS)
    assert main(["predict", str(model), str(image), str(tmp_path / "stain.png"), "--tile", "32", "--device", "cpu",
                 "--pixel-size", "0.65"]) == 0
    assert _pixel_size_lines(capsys.readouterr().err) == []
    assert read_image(tmp_path / "stain.png").pixel_size.as_list() == pytest.approx([0.65, 0.65], rel=1e-6)


# ---- the check against the model's training pixel size --------------------------------------------------------
def test_an_input_at_twice_the_magnification_is_warned_about_with_the_scale_shift_and_the_resampling(tmp_path, capsys):
    model = _tiny_model(tmp_path / "model.pt", pixel_size_um=0.65)
    image = tmp_path / "in.tif"
    tifffile.imwrite(image, PIXELS, resolution=(1e4 / 0.325, 1e4 / 0.325), resolutionunit="CENTIMETER")
    assert main(["predict", str(model), str(image), str(tmp_path / "stain.tif"), "--tile", "32", "--device", "cpu"]) == 0
    [err] = _pixel_size_lines(capsys.readouterr().err)
    assert err.startswith("warning:") and "0.325 µm" in err and "0.65 µm" in err and "100% apart" in err
    assert "--shift scale:2" in err and "Resample the image by 0.5" in err
    assert read_image(tmp_path / "stain.tif").pixel_size == PixelSize(0.325, 0.325)  # still the input's own


def test_the_tolerance_decides_what_counts_as_a_mismatch():
    image = PixelSize.square(0.7)  # 7.7 % coarser than 0.65
    assert check_pixel_size(image, 0.65, image_name="in.tif", model_name="m.pt") is None  # within the default 10 %
    note = check_pixel_size(image, 0.65, image_name="in.tif", model_name="m.pt", check=PixelSizeCheck(tolerance=0.05))
    assert note.level == "warning" and "tolerance 5%" in note.message


def test_the_tolerance_option_is_validated_before_any_work(tmp_path, capsys):
    model = _tiny_model(tmp_path / "model.pt", pixel_size_um=0.65)
    image = write_tiff(tmp_path / "in.tif", PIXELS)
    assert main(["predict", str(model), str(image), str(tmp_path / "stain.tif"), "--pixel-size-tolerance", "-1"]) == 2
    assert "tolerance" in capsys.readouterr().err
    assert not (tmp_path / "stain.tif").exists()


def test_a_model_without_a_training_pixel_size_skips_the_check_and_says_so_once():
    first = check_pixel_size(PixelSize.square(0.1), None, image_name="a.tif", model_name="old.pt")
    second = check_pixel_size(PixelSize.square(0.1), None, image_name="b.tif", model_name="old.pt")
    assert first.level == "note" and "pixel-size check is skipped" in first.message
    assert second is None


def test_an_input_without_a_pixel_size_is_noted_with_the_models(tmp_path, capsys):
    model = _tiny_model(tmp_path / "model.pt", pixel_size_um=0.65)
    image = write_tiff(tmp_path / "in.tif", PIXELS)
    assert main(["predict", str(model), str(image), str(tmp_path / "stain.tif"), "--tile", "32", "--device", "cpu"]) == 0
    [err] = _pixel_size_lines(capsys.readouterr().err)
    assert err.startswith("note:") and "does not record its pixel size" in err and "0.65 µm" in err


# ---- the training pixel size in the checkpoint ----------------------------------------------------------------
def test_source_training_records_the_manifest_pixel_size(tiny_source, tiny_synth):
    assert {row.pixel_size_um for row in tiny_synth.rows} == {0.65}
    assert load_checkpoint(tiny_source).pixel_size_um == pytest.approx(0.65)


def test_a_trained_model_checks_and_keeps_the_pixel_size_through_its_domain_scored_predict(tiny_source, tmp_path, capsys):
    image = tmp_path / "in.tif"
    pixels = np.random.default_rng(1).integers(0, 4095, size=(160, 160)).astype(np.uint16)
    tifffile.imwrite(image, pixels, resolution=(1e4 / 0.65, 1e4 / 0.65), resolutionunit="CENTIMETER")
    assert main(["predict", str(tiny_source), str(image), str(tmp_path / "stain.tif"), "--tile", "64", "--batch-size", "2",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert _pixel_size_lines(err) == [] and "predict in.tif: tiles" in err
    assert read_image(tmp_path / "stain.tif").pixel_size.as_list() == pytest.approx([0.65, 0.65])


def test_the_setting_pixel_size_comes_from_the_files_when_the_manifest_has_none(tmp_path):
    for name, size in (("a.tif", 0.5), ("b.tif", 0.5), ("c.tif", 0.52)):
        tifffile.imwrite(tmp_path / name, PIXELS, resolution=(1e4 / size, 1e4 / size), resolutionunit="CENTIMETER")
    rows = [ManifestRow(field=name[0], split="train", role="input", setting="bf", path=name) for name in ("a.tif", "b.tif", "c.tif")]
    assert setting_pixel_size(Manifest(rows, tmp_path), "bf") == pytest.approx(0.5)  # the median
    stated = [ManifestRow(field="a", split="train", role="input", setting="bf", path="a.tif", pixel_size_um=0.65)]
    assert setting_pixel_size(Manifest(stated, tmp_path), "bf") == 0.65  # the manifest's word wins over the file's


def test_a_scale_shift_changes_the_pixel_size_the_model_sees():
    assert calibration.effective_pixel_size(0.65, Shift.parse("scale:2")) == pytest.approx(0.325)
    assert calibration.effective_pixel_size(0.65, Shift.parse("overexposure:2")) == 0.65


def test_adapting_to_a_scale_shift_records_the_target_pixel_size_it_makes(tiny_source, tiny_synth, tmp_path):
    config = tmp_path / "adapt.yaml"
    config.write_text("crop_size: 64\nbatch_size: 2\ndevice: cpu\n")
    out = tmp_path / "scaled.pt"
    assert main(["adapt", str(tiny_source), "--manifest", str(tiny_synth.source), "--setting", "phase_contrast", "--shift", "scale:2",
                 "--layer", "0", "--steps", "1", "--config", str(config), "--out", str(out)]) in (0, 1)  # 1: collapsed, still written
    assert load_checkpoint(out).pixel_size_um == pytest.approx(0.325)  # 0.65 µm images zoomed by 2


def test_an_adapted_model_records_its_target_pixel_size_or_inherits_its_source():
    inherited = {"method": "lmadda", "pixel_size_um": None, "source_metadata": {"pixel_size_um": 0.65}}
    own = {**inherited, "pixel_size_um": 0.325}
    assert model_pixel_size(inherited) == 0.65
    assert model_pixel_size(own) == 0.325
    assert model_pixel_size({"method": "source"}) is None  # a checkpoint from before lmadda recorded it


# ---- real data: what the shared files really carry ------------------------------------------------------------
def test_real_colicoords_and_sephace_files_record_no_pixel_size(colicoords_dir, sephace_dir):
    # ColiCoords' ImageJ TIFFs carry no resolution; sephaCe's TIFFs were converted from ICS with tifffile's 1/1 default.
    files = sorted(colicoords_dir.glob("*/brightfield/*.tif"))[:3] + sorted((sephace_dir / "tif").glob("*/*.tif"))[:3]
    assert files
    assert [read_image(path).pixel_size for path in files] == [None] * len(files)
