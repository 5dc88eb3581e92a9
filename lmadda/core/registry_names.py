"""The names of target domains and of registered models, in one place (no MLflow, no Ray).

A *target* is the domain a model is adapted to or evaluated on: a microscope setting, with the
simulated shift applied to its images when there is one (`bright_field`,
`phase_contrast+overexposure:2.5`). The model registry holds one registered model per marker
(`lmadda-dapi`); the version that serves a target is the one the target's alias points at
(`models:/lmadda-dapi@phase_contrast-overexposure-2_5`). The promotion writes these names, the
endpoint reads them back and the CLI names its targets with them, all through this module.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

MODEL_PREFIX = "lmadda-"  # every registered model lmadda serves: lmadda-<marker>
SHIFT_SEPARATOR = "+"  # between a target's setting and its shift
SHA256_TAG = "sha256"  # a model version's tag: its generator file's SHA-256, checked on every download
LOGGED_MODEL_PREFIX = "generator-"  # a promoted generator's MLflow LoggedModel: generator-<alias of its target>


def target_name(setting: str, shift: object | None = None) -> str:
    """`bright_field`, or `phase_contrast+overexposure:2.5` with a shift (a `Shift` or its text)."""
    return f"{setting}{SHIFT_SEPARATOR}{shift}" if shift else setting


def model_name(marker: str) -> str:
    """The registered model of a marker's generators: lmadda-dapi."""
    return f"{MODEL_PREFIX}{marker}"


def marker_of(registered_model: str) -> str | None:
    """The marker of a registered model lmadda serves (`lmadda-dapi` -> `dapi`); None for any other name."""
    if registered_model.startswith(MODEL_PREFIX) and len(registered_model) > len(MODEL_PREFIX):
        return registered_model[len(MODEL_PREFIX):]
    return None


def alias_for(target: str) -> str:
    """Registry aliases allow letters, digits, '_' and '-': bright_field, phase_contrast-overexposure-2_5."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", target.replace(".", "_")).replace("+", "-")


def logged_model_name(target: str) -> str:
    """The name of a promoted generator's LoggedModel (no '/', ':', '.', '%' or quotes, as MLflow requires):
    generator-phase_contrast-overexposure-2_5."""
    return f"{LOGGED_MODEL_PREFIX}{alias_for(target)}"


def file_sha256(path: Path) -> str:
    """A generator file's SHA-256 (the `SHA256_TAG` value), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
