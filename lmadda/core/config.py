"""Configs: the strict base every config model extends, and typed, validated configs from YAML/JSON files
and command-line overrides.

Every command has one pydantic config model with `extra="forbid"`, so a misspelt key is an error
that names the key and lists the allowed ones, and a wrong value names the field and the rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from lmadda.core.errors import LmaddaError


class StrictModel(BaseModel):
    """The base of every config lmadda validates: unknown keys are refused, so a typo is an error, not a default."""

    model_config = ConfigDict(extra="forbid")


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _all_positive(rates: list[float]) -> list[float]:
    if any(rate <= 0 for rate in rates):
        raise ValueError(f"learning rates must be positive, got {rates}")
    return rates


# The learning rates a grid sweeps (the study's `lrs`, a sweep's `lr`): at least one, each above 0.
LearningRates = Annotated[list[float], Field(min_length=1), AfterValidator(_all_positive)]


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise LmaddaError(f"config file {path} not found")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise LmaddaError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmaddaError(f"config file {path} must hold a mapping of option: value, not {type(data).__name__}")
    return data


def describe_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            problems.append(f"unknown option {location!r} (allowed: {allowed})")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{location}: {item['msg']}{shown}")
    return f"{source}: " + "; ".join(problems)


def build_config(model: type[ConfigT], file: str | Path | None = None, **overrides: Any) -> ConfigT:
    """Config file values, then overrides that are not None, validated into `model`."""
    data = read_config_file(file) if file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validated(model, data, f"config {file}" if file else model.__name__)


def validated(model: type[ConfigT], data: dict[str, Any], source: str) -> ConfigT:
    """`data` validated into `model`; a validation error becomes an LmaddaError naming `source`, the field and the fix."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise LmaddaError(describe_validation_error(error, model, source)) from None
