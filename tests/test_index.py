import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmadda.data.index import IndexSpec, assign_splits, index_folder
from lmadda.data.io import write_tiff
from lmadda.data.manifest import Manifest
from lmadda.errors import LmaddaError

PATTERN = r"(?P<field>w\d+)_(?P<channel>[a-z]+)\.tif$"


def _folder(tmp_path, fields=6):
    for i in range(fields):
        for channel in ("phase", "dapi"):
            write_tiff(tmp_path / f"w{i}_{channel}.tif", np.full((8, 8), i), dtype="uint16")
    (tmp_path / "notes.tif").write_bytes(b"")  # matches no pattern
    return tmp_path


def test_index_by_pattern_assigns_roles_settings_and_all_three_splits(tmp_path):
    manifest, unmatched = index_folder(_folder(tmp_path), IndexSpec([PATTERN], targets={"dapi": "dapi"}, rename={"phase": "phase_contrast"}))
    assert manifest.settings == ["phase_contrast"] and manifest.markers == ["dapi"]
    assert unmatched == ["notes.tif"]
    assert {r.split for r in manifest.rows} == {"train", "val", "test"}
    assert len(manifest.pairs("phase_contrast", ["dapi"], "train")) >= 1


def test_split_assignment_is_deterministic_and_keeps_fields_whole():
    fields = [f"f{i}" for i in range(20)]
    assert assign_splits(fields, (0.7, 0.15, 0.15), 0) == assign_splits(list(reversed(fields)), (0.7, 0.15, 0.15), 0)
    with pytest.raises(LmaddaError, match="summing to 1"):
        assign_splits(fields, (0.5, 0.1, 0.1), 0)


def test_bad_patterns_and_names_are_explained(tmp_path):
    folder = _folder(tmp_path)
    with pytest.raises(LmaddaError, match="not a valid regular expression"):
        index_folder(folder, IndexSpec(["(?P<field>"]))
    with pytest.raises(LmaddaError, match=r"lacks the named group\(s\) \['channel'\]"):
        index_folder(folder, IndexSpec([r"(?P<field>w\d+)"]))
    with pytest.raises(LmaddaError, match="match no file"):
        index_folder(folder, IndexSpec([PATTERN], targets={"gfp": "gfp"}))
    with pytest.raises(LmaddaError, match="none of"):
        index_folder(folder, IndexSpec([r"(?P<field>zz)(?P<channel>q)"]))
    with pytest.raises(LmaddaError, match="not a folder"):
        index_folder(folder / "w0_phase.tif", IndexSpec([PATTERN]))


def test_sephace_real_data_indexes_into_focus_settings(sephace_dir, tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "sephace_manifest.sh"
    out = tmp_path / "sephace.parquet"
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(["bash", str(script), str(sephace_dir), str(out)], capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    manifest = Manifest.load(out)
    assert manifest.markers == ["dapi"]
    assert manifest.settings == [
        "bright_field", "bright_field_defocus_m10um", "bright_field_defocus_p10um",
        "bright_field_init", "bright_field_init_defocus_m25um", "bright_field_init_defocus_p25um",
    ]
    assert manifest.fields("train") == ["Set_1"] and manifest.fields("test") == ["Set_2"]
    summary = manifest.summary()
    assert "1024x1344 uint8" in summary
    pairs = manifest.pairs("bright_field_defocus_p10um", ["dapi"], "test")
    assert manifest.resolve(pairs[0][0]).is_relative_to(sephace_dir.resolve()) or manifest.resolve(pairs[0][0]).resolve().exists()
