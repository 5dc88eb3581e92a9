"""A sweep trial's spec is a validated model: its points' adaptation options are checked before any work."""

import pytest
from pydantic import ValidationError

from lmadda.sweep.trial_config import TrialSpec

BASE = {"source_checkpoint": "s.pt", "manifest": "m.parquet", "source_setting": "phase_contrast", "adapt": {"steps": 4, "batch_size": 2}}


def test_a_spec_without_points_is_one_adaptation_with_its_target_and_tags():
    spec = TrialSpec.model_validate({**BASE, "target": "bright_field+overexposure:2", "tags": {"layer": 3}, "adapt": {"layer": [3]}})
    assert [(p.key, p.target, p.tags) for p in spec.points] == [("adaptation", "bright_field+overexposure:2", {"layer": 3})]
    assert spec.adapt_options(spec.points[0])["layer"] == [3]


def test_a_points_bad_adaptation_option_is_refused_naming_the_point():
    points = [{"key": "L1", "target": "bright_field", "adapt": {"layer": [1], "lr": 1e-4}},
              {"key": "L2", "target": "bright_field", "adapt": {"layer": [2], "lr": -1.0}}]
    with pytest.raises(ValidationError, match="grid point L2: .*lr"):
        TrialSpec.model_validate({**BASE, "points": points})


def test_the_spec_survives_the_trip_through_ray_trains_loop_config():
    spec = TrialSpec.model_validate({**BASE, "points": [{"key": "L1", "target": "bright_field", "adapt": {"layer": [1]},
                                                         "tags": {"magnitude": float("nan")}}],
                                     "store": "/tmp/trial"})
    again = TrialSpec.model_validate(spec.model_dump(mode="json"))
    assert again.store == spec.store and again.points[0].key == "L1" and again.adapt == spec.adapt


def test_a_points_unreadable_target_is_refused_naming_the_point():
    points = [{"key": "L1", "target": "bright_field+overexposure", "adapt": {"layer": [1]}}]
    with pytest.raises(ValidationError, match="grid point L1: target 'bright_field\\+overexposure'"):
        TrialSpec.model_validate({**BASE, "points": points})
