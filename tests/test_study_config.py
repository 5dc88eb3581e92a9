"""The study config is checked whole before any work: crops, field sizes, typed options, each with a fix that works."""

import copy
import re

import pytest

from lmadda.core.config import build_config
from lmadda.core.errors import LmaddaError
from lmadda.study.config import IndexFolderSpec, StudyConfig

# depth 6: crops must be multiples of 64
EXPERIMENT = {
    "name": "tiny", "title": "Tiny simulated",
    "data": {"simulate": {"fields": 12, "size": 128, "seed": 3}},
    "source": {"setting": "phase_contrast", "markers": ["dapi"], "train": {"depth": 6, "crop_size": 64}},
    "grids": [{"targets": ["bright_field", "phase_contrast+scale:0.5"], "layers": [0, 11]}],
    "adapt": {"crop_size": 64},
    "oracle": {"epochs": 1},
    "criteria": {"crop_size": 64},
}


def _build(**changes):
    experiment = copy.deepcopy(EXPERIMENT)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = experiment
        for parent in parents:
            node = node[parent]
        node[key] = value
    return build_config(StudyConfig, None, experiments=[experiment])


def _refused(match: str, **changes) -> str:
    with pytest.raises(LmaddaError, match=match) as error:
        _build(**changes)
    return str(error.value)


def test_the_example_configs_pass():
    _build()
    build_config(StudyConfig, "docs/study.yaml")


@pytest.mark.parametrize("option, dotted", [("adapt.crop_size", "adapt__crop_size"), ("criteria.crop_size", "criteria__crop_size"),
                                            ("source.train.crop_size", "source__train__crop_size")])
def test_a_crop_that_is_no_multiple_of_2_to_the_depth_is_refused_with_a_multiple_that_passes(option, dotted):
    message = _refused(rf"experiment tiny: {re.escape(option)} 96 is not a multiple of 64 .*depth 6", **{dotted: 96})
    suggestion = int(re.search(rf"use {re.escape(option)} (\d+)", message).group(1))
    assert suggestion == 64
    _build(**{dotted: suggestion})


def test_a_scale_shift_below_one_needs_fields_that_still_hold_the_crops_and_both_suggested_fixes_pass():
    message = _refused(r"target phase_contrast\+scale:0.5 is 64 px .*shrunk by its scale:0.5 shift\), fewer than adapt.crop_size 128",
                       adapt__crop_size=128)
    assert "use adapt.crop_size 64" in message
    size = int(re.search(r"data.simulate.size: (\d+)", message).group(1))
    assert size == 256
    _build(adapt__crop_size=128, data__simulate__size=size)
    _build(adapt__crop_size=64)


def test_validation_rows_shrink_the_training_and_validation_rows_and_the_suggested_size_passes():
    message = _refused(r"validation rows of the source are 32 px \(data.simulate.size 128, data.validation_rows 0.25\), "
                       r"fewer than source.train.crop_size 64", data__validation_rows=0.25)
    size = int(re.search(r"data.simulate.size: (\d+)", message).group(1))
    _build(data__validation_rows=0.25, data__simulate__size=size)
    message = _refused(r"training rows of target phase_contrast\+scale:0.5 are 32 px", data__validation_rows=0.5,
                       data__simulate__size=128)
    _build(data__validation_rows=0.5, data__simulate__size=int(re.search(r"data.simulate.size: (\d+)", message).group(1)))


def test_real_images_are_checked_once_their_size_is_known():
    experiment = {**EXPERIMENT, "data": {"index": {"root": "x", "patterns": ["(?P<field>a)(?P<channel>b)"]}},
                  "adapt": {"crop_size": 128}}
    spec = build_config(StudyConfig, None, experiments=[experiment]).experiments[0]  # sizes unknown: only multiples checked
    with pytest.raises(ValueError, match=r"the smallest image in x: 200 x 300 px.*use adapt.crop_size 64 or leave that target out"):
        spec.check_field_size(200, 300, data="the smallest image in x")
    spec.check_field_size(256, 300, data="the smallest image in x")


@pytest.mark.parametrize("dotted, value, match", [
    ("source__train", {"epoch": 3}, r"experiment tiny: source.train: unknown option 'epoch'"),
    ("source__train", {"markers": ["dapi"]}, r"experiment tiny: source.train.markers comes from the experiment"),
    ("adapt", {"steps": "many"}, r"experiment tiny: adapt: steps: "),
    ("adapt", {"bn_mode": "moving"}, r"experiment tiny: adapt: bn_mode"),
    ("oracle", {"depth": 4}, r"experiment tiny: oracle.depth is fixed"),
    ("oracle", {"epochs": 0}, r"experiment tiny: oracle: epochs"),
    ("grids", [{"targets": ["bright_field"], "layers": [12]}], r"experiment tiny: layers \[12\] do not exist.*depth 6"),
])
def test_typed_options_are_validated_when_the_config_loads_naming_the_experiment_and_the_key(dotted, value, match):
    _refused(match, **{dotted: value})


def test_the_index_folder_spec_carries_bit_depth_focus_and_acquisition_options_to_the_indexer(tmp_path):
    spec = IndexFolderSpec(root=tmp_path, patterns=["(?P<field>a)(?P<channel>b)"], bit_depth=14, pixel_size_um=0.1,
                           in_focus={"b": "max"}, acquisition_fractions={"ds4": (0.8, 0.2, 0.0)}, split_fractions=(0.6, 0.2, 0.2))
    index = spec.index_spec()
    assert (index.bit_depth, index.pixel_size_um, index.in_focus) == (14, 0.1, {"b": "max"})
    assert index.acquisition_fractions == {"ds4": (0.8, 0.2, 0.0)} and index.split_fractions == (0.6, 0.2, 0.2)
    with pytest.raises(ValueError, match="bit_depth"):
        IndexFolderSpec(root=tmp_path, patterns=["x"], bit_depth=0)
    with pytest.raises(ValueError, match="in_focus"):
        IndexFolderSpec(root=tmp_path, patterns=["x"], in_focus={"b": "top"})
