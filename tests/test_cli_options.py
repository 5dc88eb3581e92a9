"""Command-line flags come from the config models: a new model option is a flag without writing it twice."""

import argparse
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from lmadda.cli import build_parser
from lmadda.cli.options import add_model_flags, flag_type, model_overrides
from lmadda.training.adapt import AdaptConfig
from lmadda.training.source import SourceTrainConfig


class _Options(BaseModel):
    steps: int = Field(10, description="how many")
    rate: float | None = None
    mode: Literal["fast", "slow"] = "fast"
    names: list[str] = Field(default_factory=list)
    on: bool = False
    pair: tuple[float, float] = (1.0, 2.0)  # no flag can carry a pair: config file only


def _parse(argv: list[str], **options) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser()
    added = add_model_flags(parser, _Options, **options)
    return parser.parse_args(argv), added


def test_each_expressible_field_becomes_a_typed_flag_and_only_given_flags_override():
    args, added = _parse(["--steps", "3", "--mode", "slow", "--names", "a,b", "--on", "yes"])
    assert added == ["steps", "rate", "mode", "names", "on"]
    assert model_overrides(args) == {"steps": 3, "mode": "slow", "names": ["a", "b"], "on": True}
    assert model_overrides(_parse([])[0]) == {}
    assert "steps" not in _parse([], skip=("steps",))[1]


def test_a_bad_flag_value_is_refused_by_argparse_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        _parse(["--mode", "medium"])
    error = capsys.readouterr().err
    assert "--mode: invalid choice: 'medium'" in error and "'fast', 'slow'" in error


def test_train_source_and_adapt_offer_every_expressible_option_of_their_config():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for command, model, skipped in (("train-source", SourceTrainConfig, set()), ("adapt", AdaptConfig, {"layer"})):
        flags = {action.dest for action in commands[command]._actions}
        expressible = {name for name, field in model.model_fields.items() if flag_type(field.annotation) is not None} - skipped
        assert expressible <= flags, f"{command}: no flag for {sorted(expressible - flags)}"
    args = parser.parse_args(["adapt", "s.pt", "--manifest", "m.parquet", "--setting", "bright_field", "--out", "a.pt",
                              "--source-anchor", "0.5", "--bn-mode", "frozen", "--saturation-collapses", "true"])
    assert model_overrides(args) == {"source_anchor": 0.5, "bn_mode": "frozen", "saturation_collapses": True}
