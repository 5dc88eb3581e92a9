"""Command-line flags made from the pydantic config models, so that an option is written once, in its model.

Every field of the model whose type a flag can carry (numbers, text, paths, yes/no, a fixed set of
choices, a comma-separated list) becomes `--field-name`, with the field's description as its help and
its Literal values as its choices. A flag left out is None and leaves the config file's value (or the
model's default) alone: `build_config` drops None overrides. Fields a command sets itself (`skip`)
and fields no flag can express (pairs, nested options) stay config-file-only.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _yes_no(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not yes or no (true/false)")


def _scalar(annotation: Any) -> tuple[Any, list | None] | None:
    """(argparse type, choices) for one annotation, None when a flag cannot carry it."""
    if typing.get_origin(annotation) is Literal:
        values = list(typing.get_args(annotation))
        if all(isinstance(v, str) for v in values):
            return str, values
        return None
    if annotation is bool:
        return _yes_no, None
    if annotation in (int, float, str):
        return annotation, None
    if annotation is Path:
        return Path, None
    if typing.get_origin(annotation) is list and typing.get_args(annotation) in ((str,), (int,), (float,)):
        item = typing.get_args(annotation)[0]
        return (lambda text: [item(part) for part in _csv(text)]), None
    return None


def flag_type(annotation: Any) -> tuple[Any, list | None] | None:
    """A field's flag type and choices; an optional field (X | None) takes X's."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar(options[0]) if len(options) == 1 else None
    return _scalar(annotation)


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *, skip: tuple[str, ...] = (),
                    help: dict[str, str] | None = None) -> list[str]:
    """Add one flag per expressible field of `model` (except `skip`); returns their field names."""
    added = []
    for name, field in model.model_fields.items():
        kind = None if name in skip else flag_type(field.annotation)
        if kind is None:
            continue
        convert, choices = kind
        text = (help or {}).get(name) or field.description or ""
        if field.default is not None and not callable(field.default_factory) and not isinstance(field.default, BaseModel):
            text = f"{text} (default {field.default})".strip()
        metavar = "A,B" if typing.get_origin(field.annotation) is list else None
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=convert, choices=choices, default=None,
                            metavar=metavar, help=text.replace("%", "%%"))
        added.append(name)
    parser.set_defaults(model_flags=added)
    return added


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags `add_model_flags` added that were given, as config overrides."""
    return {name: getattr(args, name) for name in getattr(args, "model_flags", []) if getattr(args, name, None) is not None}
