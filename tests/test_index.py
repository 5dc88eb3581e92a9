import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmadda.core.errors import LmaddaError
from lmadda.data.index import IndexSpec, assign_splits, index_folder
from lmadda.data.io import write_tiff
from lmadda.data.manifest import Manifest

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


ACQUISITION_PATTERN = r"(?P<acquisition>ds\d)/(?P<channel>brightfield|fluorescence)/(?P<field>\d+)\.tif$"


def _acquisitions(tmp_path, fields={"ds1": 6, "ds4": 10}):
    for acquisition, n in fields.items():
        for i in range(n):
            for channel in ("brightfield", "fluorescence"):
                write_tiff(tmp_path / acquisition / channel / f"{i:05d}.tif", np.full((8, 8), i), dtype="uint16")
    return tmp_path


def test_an_acquisition_group_keeps_fields_apart_makes_one_setting_per_acquisition_and_splits_each_acquisition(tmp_path):
    spec = IndexSpec([ACQUISITION_PATTERN], targets={"fluorescence": "fluor"}, rename={"brightfield": "bright_field"},
                     acquisition_fractions={"ds4": (0.8, 0.2, 0.0)}, bit_depth=14, pixel_size_um=0.065)
    manifest, unmatched = index_folder(_acquisitions(tmp_path), spec)
    assert unmatched == []
    assert manifest.settings == ["bright_field_ds1", "bright_field_ds4"] and manifest.markers == ["fluor"]
    assert len(manifest.fields()) == 16 and "ds1_00000" in manifest.fields() and "ds4_00000" in manifest.fields()
    splits = {(f.split("_")[0], r.split) for f in manifest.fields() for r in manifest.rows if r.field == f}
    assert {s for a, s in splits if a == "ds1"} == {"train", "val", "test"}  # default fractions, within ds1
    assert {s for a, s in splits if a == "ds4"} == {"train", "val"}  # its own fractions: no test field
    assert {(r.bit_depth, r.pixel_size_um) for r in manifest.rows} == {(14, 0.065)}
    assert len(manifest.pairs("bright_field_ds4", ["fluor"], "train")) == 8
    with pytest.raises(LmaddaError, match=r"acquisition\(s\) \['ds9'\], which no file has; acquisitions: ds1, ds4"):
        index_folder(tmp_path, IndexSpec([ACQUISITION_PATTERN], acquisition_fractions={"ds9": (1.0, 0.0, 0.0)}))
    with pytest.raises(LmaddaError, match="add an \\(\\?P<acquisition>...\\) group"):
        index_folder(tmp_path, IndexSpec([r"(?P<channel>brightfield|fluorescence)/(?P<field>\d+)\.tif$"],
                                         acquisition_fractions={"ds4": (1.0, 0.0, 0.0)}))
    with pytest.raises(LmaddaError, match="bit depth 0"):
        index_folder(tmp_path, IndexSpec([ACQUISITION_PATTERN], bit_depth=0))


STACK_PATTERN = r"(?P<field>f\d)_(?P<channel>bf|dapi)(?:_z(?P<z>[0-9.]+))?\.tif$"


def _stacks(tmp_path, planes=(0.0, 10.0, 20.0, 30.0, 40.0)):
    for field in ("f0", "f1", "f2"):
        for z in planes:
            write_tiff(tmp_path / f"{field}_bf_z{z:g}.tif", np.full((8, 8), z), dtype="uint16")
        write_tiff(tmp_path / f"{field}_dapi.tif", np.ones((8, 8)), dtype="uint16")
    return tmp_path


@pytest.mark.parametrize("in_focus, expected", [
    ({}, ["bf", "bf_defocus_m10um", "bf_defocus_m20um", "bf_defocus_p10um", "bf_defocus_p20um"]),  # median: 20
    ({"bf": "min"}, ["bf", "bf_defocus_p10um", "bf_defocus_p20um", "bf_defocus_p30um", "bf_defocus_p40um"]),
    ({"bf": "max"}, ["bf", "bf_defocus_m10um", "bf_defocus_m20um", "bf_defocus_m30um", "bf_defocus_m40um"]),
    ({"bf": 10.0}, ["bf", "bf_defocus_m10um", "bf_defocus_p10um", "bf_defocus_p20um", "bf_defocus_p30um"]),
    ({"bf": "30"}, ["bf", "bf_defocus_m10um", "bf_defocus_m20um", "bf_defocus_m30um", "bf_defocus_p10um"]),  # as the CLI gives it
])
def test_the_in_focus_plane_of_a_stack_is_its_median_or_the_one_named(tmp_path, in_focus, expected):
    manifest, _ = index_folder(_stacks(tmp_path), IndexSpec([STACK_PATTERN], targets={"dapi": "dapi"}, in_focus=in_focus))
    assert manifest.settings == expected


def test_a_bad_in_focus_plane_is_explained(tmp_path):
    folder = _stacks(tmp_path)
    with pytest.raises(LmaddaError, match=r"in-focus z 15 of channel 'bf' is no plane of field 'f0'.*planes 0, 10, 20, 30, 40"):
        index_folder(folder, IndexSpec([STACK_PATTERN], targets={"dapi": "dapi"}, in_focus={"bf": 15.0}))
    with pytest.raises(LmaddaError, match=r"\['dapi'\], which has no focus stack.*channels with stacks: bf"):
        index_folder(folder, IndexSpec([STACK_PATTERN], targets={"dapi": "dapi"}, in_focus={"dapi": "median"}))
    with pytest.raises(LmaddaError, match="give a z in micrometres or one of median, min, max"):
        index_folder(folder, IndexSpec([STACK_PATTERN], targets={"dapi": "dapi"}, in_focus={"bf": "top"}))


def test_data_index_command_takes_focus_acquisition_and_bit_depth_options(tmp_path, capsys):
    from lmadda.cli import main

    folder = _stacks(tmp_path / "stacks")
    out = tmp_path / "m.parquet"
    assert main(["data", "index", str(folder), "--pattern", STACK_PATTERN, "--target", "dapi=dapi", "--in-focus", "bf=min",
                 "--bit-depth", "12", "--out", str(out)]) == 0
    manifest = Manifest.load(out)
    assert "bf_defocus_p40um" in manifest.settings and {r.bit_depth for r in manifest.rows} == {12}
    folder = _acquisitions(tmp_path / "acquisitions")
    assert main(["data", "index", str(folder), "--pattern", ACQUISITION_PATTERN, "--target", "fluorescence=fluor",
                 "--acquisition-fractions", "ds4=0.5,0.5,0", "--out", str(out)]) == 0
    assert not any(f.startswith("ds4") for f in Manifest.load(out).fields("test"))
    with pytest.raises(SystemExit):
        main(["data", "index", str(folder), "--pattern", ACQUISITION_PATTERN, "--acquisition-fractions", "ds4", "--out", str(out)])
    assert "--acquisition-fractions: 'ds4' must be NAME=VALUE" in capsys.readouterr().err


def test_colicoords_real_data_indexes_in_place_with_one_bright_field_setting_per_acquisition(colicoords_dir, tmp_path):
    spec = IndexSpec([ACQUISITION_PATTERN], targets={"fluorescence": "fluor"}, rename={"brightfield": "bright_field"},
                     acquisition_fractions={"ds4": (0.8, 0.2, 0.0)})
    manifest, unmatched = index_folder(colicoords_dir, spec)
    assert unmatched == []
    assert manifest.settings == ["bright_field_ds1", "bright_field_ds2", "bright_field_ds4"] and manifest.markers == ["fluor"]
    assert len(manifest.fields()) == 32
    assert {f for f in manifest.fields("test")} and all(not f.startswith("ds4") for f in manifest.fields("test"))
    saved = Manifest.load(manifest.save(tmp_path / "colicoords.parquet"))
    assert saved.resolve(saved.rows[0]).resolve() == (colicoords_dir / manifest.rows[0].path).resolve()  # in place: nothing copied
    assert "512x512 uint16" in saved.summary()
