"""OME-Zarr in and out: images and HCS plates written here by ome-zarr itself, read by `lmadda predict` and
`lmadda data index`; predictions streamed row band by row band equal the in-memory TIFF path."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

ome_zarr = pytest.importorskip("ome_zarr", reason="OME-Zarr support is the optional extra: pip install 'lmadda[zarr]'")
zarr = pytest.importorskip("zarr", reason="OME-Zarr support is the optional extra: pip install 'lmadda[zarr]'")
from ome_zarr.format import FormatV04, FormatV05  # noqa: E402
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Reader  # noqa: E402
from ome_zarr.writer import write_image as ome_zarr_write_image, write_plate_metadata, write_well_metadata  # noqa: E402

from lmadda.corrections.baselines import HistogramMatcher  # noqa: E402
from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint, save_checkpoint  # noqa: E402
from lmadda.cli import main  # noqa: E402
from lmadda.core.errors import LmaddaError  # noqa: E402
from lmadda.data.bands import ValueCounts, blocks, percentiles  # noqa: E402
from lmadda.data.calibration import PixelSize
from lmadda.data.dataset import load_images  # noqa: E402
from lmadda.data.index import IndexSpec, index_folder, index_plate  # noqa: E402
from lmadda.data.io import read_image, read_pixel_size, write_image, write_tiff  # noqa: E402
from lmadda.data.manifest import setting_pixel_size  # noqa: E402
from lmadda.data.manifest import Manifest  # noqa: E402
from lmadda.data.normalise import NormalisationParams  # noqa: E402
from lmadda.data.omezarr import open_image, plate_fields  # noqa: E402
from lmadda.domain import build_reference  # noqa: E402
from lmadda.inference import ModelInputRows, model_input, predict_file  # noqa: E402
from lmadda.models import GeneratorConfig, UNetGenerator  # noqa: E402
from lmadda.models.generator import init_weights  # noqa: E402
from lmadda.models.tiling import BandedTilePlan, predict_banded, predict_tiled

FORMATS = {"0.4": FormatV04(), "0.5": FormatV05()}


class ArraySource:
    """An image already in memory, (C, H, W), as a `lmadda.data.bands.RegionSource`: the banded paths on known pixels."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels

    @property
    def shape(self) -> tuple[int, int, int]:
        channels, height, width = self.pixels.shape
        return channels, height, width

    @property
    def chunks(self) -> tuple[int, int]:
        return 1, self.pixels.shape[2]

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.pixels[:, top : top + height, left : left + width]


def _generator(out_channels: int = 2) -> UNetGenerator:
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3, out_channels=out_channels))
    init_weights(generator)
    return generator.eval()


def _model(folder, *, correction: bool = False, reference: bool = False):
    generator = _generator()
    metadata = {}
    if correction:  # as `adapt --layer auto` stores a label-free choice of histogram matching
        source = np.random.default_rng(5).normal(0.2, 0.3, size=(1, 64, 64)).astype(np.float32)
        metadata["input_correction"] = HistogramMatcher.from_source_values(list(np.quantile(source, np.linspace(0, 1, 1001)))).as_correction()
    domain = None
    if reference:
        images = [np.random.default_rng(seed).uniform(-1, 1, size=(1, 64, 64)).astype(np.float32) for seed in range(3)]
        domain = build_reference(generator, images, None, domain="noise", crop_size=32, crops=4)
    checkpoint = GeneratorCheckpoint(generator=generator, markers=["dapi", "cd29"], setting="phase_contrast",
                                     target_norm=NormalisationParams((500.0, 600.0), (20000.0, 8000.0)), metadata=metadata,
                                     domain_reference=domain)
    return save_checkpoint(folder / f"model{'-hm' if correction else ''}{'-ref' if reference else ''}.pt", checkpoint)


def _pixels(height: int = 150, width: int = 110, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4095, size=(height, width)).astype(np.uint16)


def _write_zarr_image(path, pixels: np.ndarray, *, version: str = "0.4", pixel_size: PixelSize | None = None,
                      axes: str = "cyx", chunks: int = 32, labels: list[str] | None = None):
    """An OME-Zarr image as ome-zarr writes one (with a pyramid, so lmadda must take the full-resolution level)."""
    fmt = FORMATS[version]
    array = pixels if pixels.ndim == len(axes) else pixels.reshape((1,) * (len(axes) - pixels.ndim) + pixels.shape)
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    scale = {axis: 1.0 for axis in axes}
    units = None
    if pixel_size is not None:
        scale.update(y=pixel_size.y_um, x=pixel_size.x_um)
        units = {"y": "micrometer", "x": "micrometer"}
    metadata = {"metadata": {"omero": {"channels": [{"label": label} for label in labels]}}} if labels else {}
    ome_zarr_write_image(array, group, fmt=fmt, axes=axes, scale=scale, axes_units=units, scale_factors=[2],
                storage_options={"chunks": tuple(1 if axis in "tcz" else chunks for axis in axes)}, **metadata)
    return path


def _read_with_ome_zarr(path) -> tuple[np.ndarray, dict]:
    """The full-resolution level and metadata as ome-zarr's own reader sees them: the output is valid OME-Zarr."""
    node = next(iter(Reader(parse_url(str(path)))()))
    return np.asarray(node.data[0]), node.metadata


# ---- exact statistics in bands ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_percentiles_in_bands_equal_numpy_percentiles_of_the_whole_image(dtype):
    rng = np.random.default_rng(1)
    pixels = (rng.integers(0, 4095, size=(2, 37, 23)) if dtype == "uint16" else rng.normal(-3, 50, size=(2, 37, 23))).astype(np.float32)
    pixels[1, :5] = 7.0  # ties
    levels = [0.0, 1.0, 37.5, 50.0, 99.8, 100.0]
    banded = percentiles(ArraySource(pixels), levels, values=2 * 23 * 4)  # bands of 4 rows
    expected = np.percentile(pixels.reshape(2, -1).astype(np.float64), levels, axis=1).T
    np.testing.assert_array_equal(banded, expected)


@pytest.mark.parametrize("values", [1 << 20, 3 * 16 * 16 * 2], ids=["full-width bands", "chunks side by side"])
def test_an_ome_zarr_is_read_chunk_by_chunk_for_its_percentiles(tmp_path, values):
    image = open_image(_write_zarr_image(tmp_path / "in.ome.zarr", _pixels(100, 90), chunks=16))
    assert image.chunks == (16, 16)
    covered = [block.shape for block in blocks(image, values)]
    assert sum(rows * columns for _, rows, columns in covered) == 100 * 90
    assert all(rows % 16 == 0 or rows in (100, 100 % 16) for _, rows, _ in covered)  # whole rows of chunks
    np.testing.assert_array_equal(percentiles(image, [1.0, 99.8], values),
                                  np.percentile(_pixels(100, 90).reshape(1, -1).astype(np.float64), [1.0, 99.8], axis=1).T)


def test_value_counts_in_bands_equal_unique_counts_of_the_whole_image():
    pixels = np.random.default_rng(2).integers(0, 50, size=(1, 40, 30)).astype(np.float32)
    counts = ValueCounts()
    for top in range(0, 40, 7):
        counts.add(pixels[:, top : top + 7])
    values, expected = np.unique(pixels, return_counts=True)
    np.testing.assert_array_equal(counts.values, values)
    np.testing.assert_array_equal(counts.counts, expected)


@pytest.mark.parametrize("correction", [False, True], ids=["plain", "histogram_matching"])
def test_model_input_read_in_bands_equals_model_input_of_the_whole_image(tmp_path, correction):
    checkpoint = load_checkpoint(_model(tmp_path, correction=correction))
    pixels = _pixels(90, 70)[None].astype(np.float32)
    rows = ModelInputRows(ArraySource(pixels), checkpoint, values=70 * 11)  # bands of 11 rows
    np.testing.assert_array_equal(np.concatenate([rows(top, min(top + 13, 90)) for top in range(0, 90, 13)], axis=1),
                                  model_input(pixels, checkpoint))


# ---- the banded plan -----------------------------------------------------------------------------
@pytest.mark.parametrize("overlap, batch_size", [(0.25, 3), (0.5, 8), (0.0, 2)])
def test_banded_plan_gives_the_in_memory_plan_s_pixels_on_an_image_several_tiles_tall(overlap, batch_size):
    generator = _generator()
    image = np.random.default_rng(3).normal(size=(1, 5 * 64 + 13, 150)).astype(np.float32)
    whole = predict_tiled(generator, image, tile=64, overlap=overlap, batch_size=batch_size, device="cpu")
    written, reads = [], []

    def read_rows(top, bottom):
        reads.append(bottom - top)
        return image[:, top:bottom]

    predict_banded(generator, read_rows, image.shape[1:], lambda top, rows: written.append((top, rows)), tile=64, overlap=overlap,
                   batch_size=batch_size, device="cpu")
    assert [top for top, _ in written] == sorted({top for top, _ in written}) and written[0][0] == 0  # top to bottom, once
    assert max(reads) <= 64  # the input is read one row of tiles at a time
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in written], axis=1), whole)


def test_banded_plan_keeps_accumulators_one_tile_high():
    plan = BandedTilePlan(10_000, 300, GeneratorConfig(ngf=4, depth=3), lambda top, bottom: None, lambda top, rows: None, tile=64)
    assert plan.output.shape == (1, 64, 300) and plan.weight.shape == (64, 300)


def test_banded_plan_pads_a_small_image_as_the_in_memory_plan_does():
    generator = _generator()
    image = np.random.default_rng(4).normal(size=(1, 37, 50)).astype(np.float32)
    written = []
    predict_banded(generator, lambda top, bottom: image[:, top:bottom], (37, 50), lambda top, rows: written.append(rows), tile=64,
                   device="cpu")
    np.testing.assert_array_equal(np.concatenate(written, axis=1), predict_tiled(generator, image, tile=64, device="cpu"))


# ---- predict: OME-Zarr in and out ----------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_predict_reads_an_ome_zarr_image_as_it_reads_the_tiff_of_the_same_pixels(tmp_path, version):
    model = _model(tmp_path)
    pixels = _pixels()
    write_tiff(tmp_path / "in.tif", pixels, dtype="uint16")
    _write_zarr_image(tmp_path / "in.ome.zarr", pixels, version=version, axes="tczyx")
    assert read_image(tmp_path / "in.ome.zarr").pixels.shape == (1, 150, 110)
    np.testing.assert_array_equal(read_image(tmp_path / "in.ome.zarr").pixels, read_image(tmp_path / "in.tif").pixels)
    from_tiff = predict_file(model, tmp_path / "in.tif", tmp_path / "from_tiff.tif", tile=64, device="cpu")
    from_zarr = predict_file(model, tmp_path / "in.ome.zarr", tmp_path / "from_zarr.tif", tile=64, device="cpu")
    np.testing.assert_array_equal(read_image(from_zarr).pixels, read_image(from_tiff).pixels)


@pytest.mark.parametrize("correction, reference", [(False, False), (True, True)], ids=["plain", "corrected_and_scored"])
def test_predict_writes_ome_zarr_with_the_tiff_path_s_values(tmp_path, correction, reference):
    model = _model(tmp_path, correction=correction, reference=reference)
    pixels = _pixels(200, 90)
    write_tiff(tmp_path / "in.tif", pixels, dtype="uint16")
    _write_zarr_image(tmp_path / "in.ome.zarr", pixels)
    domains = []
    tiff = read_image(predict_file(model, tmp_path / "in.tif", tmp_path / "out.tif", tile=64, device="cpu", on_domain=domains.append))
    for source in ("in.tif", "in.ome.zarr"):
        out = predict_file(model, tmp_path / source, tmp_path / f"{source}.out.ome.zarr", tile=64, device="cpu", on_domain=domains.append)
        values, metadata = _read_with_ome_zarr(out)
        assert values.dtype == np.uint16 and values.shape == (2, 200, 90)
        np.testing.assert_array_equal(values.astype(np.float32), tiff.pixels)
        attributes = zarr.open_group(str(out), mode="r").attrs.asdict()
        assert [channel["label"] for channel in attributes["omero"]["channels"]] == ["dapi", "cd29"]
        lmadda = attributes["lmadda"]
        assert lmadda["lmadda_markers"] == "dapi,cd29"
        assert ("lmadda_domain" in lmadda) == reference
    if reference:
        assert domains[0].score == pytest.approx(domains[1].score) == pytest.approx(domains[2].score)
    assert not list(tmp_path.glob(".*.partial"))


def test_predict_into_ome_zarr_is_written_by_rows_never_holding_the_whole_output(tmp_path, monkeypatch):
    from lmadda.data import omezarr

    model = _model(tmp_path)
    _write_zarr_image(tmp_path / "tall.ome.zarr", _pixels(700, 60), chunks=64)
    writes = []
    original = omezarr.OmeZarrWriter._flush

    def flush(self):
        writes.append((self.written, self.next_row))
        original(self)

    monkeypatch.setattr(omezarr.OmeZarrWriter, "_flush", flush)
    out = predict_file(model, tmp_path / "tall.ome.zarr", tmp_path / "tall-stain.ome.zarr", tile=64, device="cpu")
    assert writes == [(top, min(top + 512, 700)) for top in range(0, 700, 512)]  # whole rows of 512-row chunks, once each
    assert zarr.open_group(str(out), mode="r")["0"].chunks == (1, 512, 60)


def test_the_written_pixel_size_round_trips(tmp_path):
    model = _model(tmp_path)
    size = PixelSize(0.65, 0.5)
    _write_zarr_image(tmp_path / "in.ome.zarr", _pixels(), pixel_size=size)
    assert read_pixel_size(tmp_path / "in.ome.zarr") == size
    out = predict_file(model, tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", tile=64, device="cpu")
    assert read_pixel_size(out) == size
    _, metadata = _read_with_ome_zarr(out)
    assert metadata["coordinateTransformations"][0] == [{"type": "scale", "scale": [1.0, 0.5, 0.65]}]
    assert [axis.get("unit") for axis in metadata["axes"]] == [None, "micrometer", "micrometer"]
    # a TIFF's calibration goes into the OME-Zarr, and --pixel-size overrides what the file says
    write_tiff(tmp_path / "in.tif", _pixels(), dtype="uint16", pixel_size=PixelSize.square(0.325))
    assert read_pixel_size(predict_file(model, tmp_path / "in.tif", tmp_path / "t.ome.zarr", tile=64, device="cpu")) == PixelSize.square(0.325)
    stated = predict_file(model, tmp_path / "in.ome.zarr", tmp_path / "s.ome.zarr", tile=64, device="cpu", pixel_size=PixelSize.square(1.3))
    assert read_pixel_size(stated) == PixelSize.square(1.3)
    # nanometres are converted; a scale without a unit is no calibration
    _write_zarr_image(tmp_path / "nm.ome.zarr", _pixels(), pixel_size=PixelSize.square(650.0))
    attrs = zarr.open_group(str(tmp_path / "nm.ome.zarr"), mode="r+")
    multiscales = attrs.attrs["multiscales"]
    multiscales[0]["axes"][1]["unit"] = multiscales[0]["axes"][2]["unit"] = "nanometer"
    attrs.attrs["multiscales"] = multiscales
    assert read_pixel_size(tmp_path / "nm.ome.zarr") == PixelSize.square(0.65)
    _write_zarr_image(tmp_path / "bare.ome.zarr", _pixels())
    assert read_pixel_size(tmp_path / "bare.ome.zarr") is None
    # write_image writes OME-Zarr by its name too
    written = read_image(write_image(tmp_path / "w.ome.zarr", _pixels(), dtype="uint16", pixel_size=size))
    assert written.pixel_size == size and written.dtype == "uint16"
    np.testing.assert_array_equal(written.pixels[0], _pixels())


def test_predict_cli_writes_ome_zarr_and_replaces_only_what_it_wrote(tmp_path, capsys):
    model = _model(tmp_path)
    _write_zarr_image(tmp_path / "in.ome.zarr", _pixels())
    command = ["predict", str(model), str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--tile", "64", "--device", "cpu"]
    assert main(command) == 0
    assert main(command) == 0  # an image lmadda wrote is replaced
    assert "wrote" in capsys.readouterr().out
    refused = ["predict", str(model), str(tmp_path / "in.ome.zarr"), str(tmp_path / "in.ome.zarr"), "--tile", "64", "--device", "cpu"]
    assert main(refused) == 2
    assert "would overwrite the input IN" in capsys.readouterr().err
    assert read_image(tmp_path / "in.ome.zarr").pixels.shape == (1, 150, 110)  # the input is untouched
    _write_zarr_image(tmp_path / "theirs.ome.zarr", _pixels())  # another tool's image, not an input
    foreign = ["predict", str(model), str(tmp_path / "in.ome.zarr"), str(tmp_path / "theirs.ome.zarr"), "--tile", "64", "--device", "cpu"]
    assert main(foreign) == 2
    assert "was not written by lmadda predict; remove it or choose another name" in capsys.readouterr().err
    assert read_image(tmp_path / "theirs.ome.zarr").pixels.shape == (1, 150, 110)


# ---- plates --------------------------------------------------------------------------------------
def _write_plate(path, *, version: str = "0.4", wells=("A/1", "A/2", "B/1", "B/2"), fields: int = 2):
    fmt = FORMATS[version]
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_plate_metadata(group, ["A", "B"], ["1", "2"], list(wells), fmt=fmt)
    for number, well in enumerate(wells):
        well_group = group.require_group(well)
        write_well_metadata(well_group, [{"path": str(index)} for index in range(fields)], fmt=fmt)
        for index in range(fields):
            pixels = np.stack([_pixels(64, 64, seed=10 * number + index), _pixels(64, 64, seed=100 + 10 * number + index)])
            _write_zarr_image(path / well / str(index), pixels, version=version, pixel_size=PixelSize.square(0.65),
                              labels=["Phase", "DAPI"])
    return path


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_plate_index_lists_every_well_and_field_with_its_channels(tmp_path, version, capsys):
    plate = _write_plate(tmp_path / "plate.ome.zarr", version=version)
    assert [field.field_id for field in plate_fields(plate)] == ["A1_0", "A1_1", "A2_0", "A2_1", "B1_0", "B1_1", "B2_0", "B2_1"]
    out = tmp_path / "manifest.parquet"
    assert main(["data", "index", str(plate), "--rename", "Phase=phase_contrast", "--target", "DAPI=dapi", "--split", "A1=test",
                 "--out", str(out)]) == 0
    assert "8 fields" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert manifest.fields() == ["A1_0", "A1_1", "A2_0", "A2_1", "B1_0", "B1_1", "B2_0", "B2_1"]
    assert manifest.settings == ["phase_contrast"] and manifest.markers == ["dapi"]
    rows = {(row.field, row.role): row for row in manifest.rows}
    assert (rows[("B2_1", "input")].path, rows[("B2_1", "input")].channel_index) == ("plate.ome.zarr/B/2/1", 0)
    assert (rows[("B2_1", "target")].path, rows[("B2_1", "target")].channel_index) == ("plate.ome.zarr/B/2/1", 1)
    well_of = {row.field: row.field.split("_")[0] for row in manifest.rows}
    splits = {}
    for row in manifest.rows:
        splits.setdefault(well_of[row.field], set()).add(row.split)
    assert all(len(found) == 1 for found in splits.values()) and splits["A1"] == {"test"}  # a well stays in one split
    # the fields read as images: pairs load, and the plate's pixel size is found
    split = next(iter(splits["A2"]))
    loaded = load_images(manifest, "phase_contrast", split, markers=["dapi"])
    assert len(loaded) == 2 and loaded[0].input.shape == (1, 64, 64) and loaded[0].target.shape == (1, 64, 64)
    assert setting_pixel_size(manifest, "phase_contrast") == pytest.approx(0.65)


def test_predict_stains_a_plate_field_from_the_channel_named(tmp_path, capsys):
    model = _model(tmp_path)
    plate = _write_plate(tmp_path / "plate.ome.zarr", wells=("A/1",), fields=1)
    phase = read_image(plate / "A" / "1" / "0").pixels[0].astype(np.uint16)
    write_tiff(tmp_path / "phase.tif", phase, dtype="uint16")
    write_tiff(tmp_path / "both.tif", read_image(plate / "A" / "1" / "0").pixels, dtype="uint16")
    expected = read_image(predict_file(model, tmp_path / "phase.tif", tmp_path / "phase-stain.tif", tile=64, device="cpu")).pixels
    for source, channel in ((plate / "A" / "1" / "0", "Phase"), (plate / "A" / "1" / "0", "0"), (tmp_path / "both.tif", "0")):
        out = predict_file(model, source, tmp_path / "stain.ome.zarr", tile=64, device="cpu", channel=channel)
        np.testing.assert_array_equal(read_image(out).pixels, expected)
    assert main(["predict", str(model), str(plate / "A" / "1" / "0"), str(tmp_path / "x.ome.zarr"), "--device", "cpu"]) == 2
    assert "has 2 channel(s); the model" in (error := capsys.readouterr().err) and "pick the input with --channel (its channels: Phase, DAPI)" in error
    with pytest.raises(LmaddaError, match=r"no channel 'GFP'; its channels are 0 \(Phase\), 1 \(DAPI\)"):
        predict_file(model, plate / "A" / "1" / "0", tmp_path / "x.ome.zarr", channel="GFP")


def test_plate_index_explains_what_does_not_apply(tmp_path):
    plate = _write_plate(tmp_path / "plate.ome.zarr", wells=("A/1",), fields=1)
    with pytest.raises(LmaddaError, match="--pattern does not apply"):
        index_plate(plate, IndexSpec(patterns=[r"(?P<field>\w+)_(?P<channel>\w+)"]))
    with pytest.raises(LmaddaError, match=r"--target names \['GFP'\] match no channel of the plate; channels found: \['DAPI', 'Phase'\]"):
        index_plate(plate, IndexSpec(patterns=[], targets={"GFP": "gfp"}))
    with pytest.raises(LmaddaError, match="neither wells"):
        index_plate(plate, IndexSpec(patterns=[], splits={"Z9": "test"}))


def test_a_folder_of_ome_zarr_images_is_indexed_by_pattern(tmp_path):
    for field in ("f1", "f2", "f3"):
        _write_zarr_image(tmp_path / "images" / f"{field}_phase.ome.zarr", _pixels(40, 40))
        write_tiff(tmp_path / "images" / f"{field}_dapi.tif", _pixels(40, 40), dtype="uint16")
    manifest, unmatched = index_folder(tmp_path / "images", IndexSpec(patterns=[r"(?P<field>\w+)_(?P<channel>\w+)\.(ome\.zarr|tif)$"],
                                                                       targets={"dapi": "dapi"}))
    assert unmatched == [] and manifest.fields() == ["f1", "f2", "f3"]
    assert sorted(row.path for row in manifest.rows if row.role == "input") == ["f1_phase.ome.zarr", "f2_phase.ome.zarr", "f3_phase.ome.zarr"]
    _write_plate(tmp_path / "images" / "plate.ome.zarr", wells=("A/1",), fields=1)
    with pytest.raises(LmaddaError, match="is an HCS plate inside the folder"):
        index_folder(tmp_path / "images", IndexSpec(patterns=[r"(?P<field>\w+)_(?P<channel>\w+)"]))


# ---- clear errors --------------------------------------------------------------------------------
def test_bad_ome_zarr_paths_give_clear_errors(tmp_path, capsys):
    model = _model(tmp_path)
    with pytest.raises(LmaddaError, match="missing.ome.zarr: not found; give the folder of an OME-Zarr image"):
        read_image(tmp_path / "missing.ome.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(LmaddaError, match="empty.zarr: not a Zarr group"):
        open_image(tmp_path / "empty.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(LmaddaError, match="without OME-NGFF `multiscales` metadata"):
        open_image(tmp_path / "plain.zarr")
    plate = _write_plate(tmp_path / "plate.ome.zarr", wells=("A/1",), fields=1)
    with pytest.raises(LmaddaError, match=r"is an HCS plate \(1 wells\), not one image; give one field, e.g. .*plate.ome.zarr/A/1/0"):
        open_image(plate)
    with pytest.raises(LmaddaError, match="is a well of an HCS plate .*give one field, e.g. .*A/1/0"):
        open_image(plate / "A" / "1")
    stack = np.stack([_pixels(32, 32, seed=seed) for seed in range(3)])[:, None]  # z=3, c=1 ... as (z, c, y, x) -> write czyx
    _write_zarr_image(tmp_path / "stack.ome.zarr", np.moveaxis(stack, 0, 1), axes="czyx")
    with pytest.raises(LmaddaError, match="has 3 z-planes .* write one z-plane per image, or a projection"):
        open_image(tmp_path / "stack.ome.zarr")
    code = main(["predict", str(model), str(plate), str(tmp_path / "out.ome.zarr"), "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2 and "is an HCS plate" in error and len([line for line in error.splitlines() if "lmadda: error" in line]) == 1
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(LmaddaError, match="a file, not a folder|exists and was not written by lmadda"):
        predict_file(model, plate / "A" / "1" / "0", tmp_path / "notes" / "keep.txt" / "x.ome.zarr", device="cpu")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_missing_zarr_libraries_name_the_extra_to_install(tmp_path, monkeypatch):
    _write_zarr_image(tmp_path / "in.ome.zarr", _pixels())
    monkeypatch.setitem(sys.modules, "zarr", None)  # as if `lmadda[zarr]` were not installed
    with pytest.raises(LmaddaError, match=r"needs the optional Zarr libraries \(zarr is not installed\); install them with: "
                                          r"pip install 'lmadda\[zarr\]'"):
        read_image(tmp_path / "in.ome.zarr")
