from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmadda.core.errors import LmaddaError
from lmadda.data.manifest import Manifest, ManifestRow


def _rows():
    return [
        ManifestRow(field="f1", split="train", role="input", setting="phase_contrast", path="f1_pc.tif", bit_depth=12),
        ManifestRow(field="f1", split="train", role="target", marker="dapi", path="f1_dapi.tif", pixel_size_um=0.65),
        ManifestRow(field="f2", split="test", role="input", setting="phase_contrast", path="f2_pc.tif"),
        ManifestRow(field="f2", split="test", role="target", marker="dapi", path="f2_dapi.tif"),
    ]


def test_manifest_round_trips_through_parquet_with_paths_relative_to_it(tmp_path):
    manifest = Manifest(_rows(), root=tmp_path / "data")
    saved = manifest.save(tmp_path / "elsewhere" / "m.parquet")
    loaded = Manifest.load(saved)
    assert [loaded.resolve(r).resolve() for r in loaded.rows] == [manifest.resolve(r).resolve() for r in manifest.rows]
    assert [replace(r, path="") for r in loaded.rows] == [replace(r, path="") for r in manifest.rows]
    assert loaded.rows[0].path == "../data/f1_pc.tif"


def test_unknown_columns_are_named(tmp_path):
    table = pa.table({"field": ["f"], "split": ["train"], "role": ["input"], "path": ["a.tif"], "colour": ["red"]})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(LmaddaError, match=r"unknown columns \['colour'\]"):
        Manifest.load(tmp_path / "m.parquet")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"split": "training"}, "unknown split 'training'; allowed: train, val, test"),
        ({"role": "label"}, "unknown role 'label'"),
        ({"setting": "Bright Field"}, "setting name 'Bright Field' is not allowed"),
    ],
)
def test_bad_rows_are_rejected_with_the_allowed_values(tmp_path, change, message):
    rows = _rows()
    rows[0] = replace(rows[0], **change)
    with pytest.raises(LmaddaError, match=message):
        Manifest(rows, root=tmp_path)


def test_duplicate_images_and_fields_in_two_splits_are_rejected(tmp_path):
    rows = _rows()
    with pytest.raises(LmaddaError, match="two input images"):
        Manifest(rows + [replace(rows[0], path="other.tif")], root=tmp_path)
    with pytest.raises(LmaddaError, match="two splits"):
        Manifest(rows + [replace(rows[1], marker="cd29", split="val")], root=tmp_path)


def test_an_empty_split_or_unknown_setting_is_a_clear_error(tmp_path):
    manifest = Manifest(_rows(), root=tmp_path)
    with pytest.raises(LmaddaError, match="split 'val' has no 'phase_contrast' images"):
        manifest.inputs("phase_contrast", "val")
    with pytest.raises(LmaddaError, match="no setting 'bright_field'; known: phase_contrast"):
        manifest.pairs("bright_field", ["dapi"], "train")
    with pytest.raises(LmaddaError, match="no marker 'cd29'"):
        manifest.pairs("phase_contrast", ["cd29"], "train")


def test_missing_or_non_parquet_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(LmaddaError, match="not found; build one"):
        Manifest.load(tmp_path / "none.parquet")
    (tmp_path / "m.parquet").write_text("field,split\n")
    with pytest.raises(LmaddaError, match="not a readable Parquet file"):
        Manifest.load(tmp_path / "m.parquet")
