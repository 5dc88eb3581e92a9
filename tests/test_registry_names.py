"""The registry's names are built in one module (lmadda.core.registry_names), and are the names stores already hold."""

from __future__ import annotations

import re

import pytest

from lmadda.data.shifts import Shift
from lmadda.core.registry_names import SHA256_TAG, alias_for, logged_model_name, marker_of, model_name, target_name


def _alias_before_the_move(target: str) -> str:
    """tune.tracking.alias_for as it was before the names moved here (commit 2585bac): what existing stores hold."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", target.replace(".", "_")).replace("+", "-")


TARGETS = ["bright_field", "phase_contrast", "phase_contrast+overexposure:2.5", "phase_contrast+overexposure:2", "bright_field+defocus:1.5",
           "phase_contrast+scale:0.5", "dic+noise:0.05", "setting with space", "a.b+c:d"]


@pytest.mark.parametrize("target", TARGETS)
def test_aliases_are_the_ones_existing_stores_hold(target):
    assert alias_for(target) == _alias_before_the_move(target)


def test_names_stay_what_promotion_and_the_endpoint_always_used():
    assert alias_for("bright_field") == "bright_field"
    assert alias_for("phase_contrast+overexposure:2.5") == "phase_contrast-overexposure-2_5"
    assert model_name("dapi") == "lmadda-dapi" and model_name("cd29") == "lmadda-cd29"
    assert marker_of("lmadda-dapi") == "dapi" and marker_of("lmadda-cd29") == "cd29"
    assert marker_of("other-model") is None and marker_of("lmadda-") is None
    assert SHA256_TAG == "sha256"


def test_a_target_is_its_setting_with_the_shift_after_a_plus():
    assert target_name("bright_field") == "bright_field"
    assert target_name("bright_field", None) == target_name("bright_field", "") == "bright_field"
    assert target_name("phase_contrast", "overexposure:2.5") == "phase_contrast+overexposure:2.5"
    assert target_name("phase_contrast", Shift.parse("overexposure:2.50")) == "phase_contrast+overexposure:2.5"


def test_the_study_and_the_cli_name_a_target_alike():
    from lmadda.evaluation.rows import TargetDomain

    for text in ("bright_field", "phase_contrast+overexposure:2.5", "phase_contrast+defocus:1"):
        domain = TargetDomain.parse(text)
        assert target_name(domain.setting, domain.shift) == domain.name == text


def test_a_logged_model_name_is_one_mlflow_accepts():
    for target in TARGETS:
        name = logged_model_name(target)
        assert name.startswith("generator-") and not set(name) & set("/:.%\"'")
    assert logged_model_name("phase_contrast+overexposure:2.5") == "generator-phase_contrast-overexposure-2_5"


def test_model_names_round_trip():
    for marker in ("dapi", "cd29", "actin-1"):
        assert marker_of(model_name(marker)) == marker
