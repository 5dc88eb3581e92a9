"""What the validation benches share: one experiment of a study config, with its data and its source model
reused from the study's `out` folder (run them after `make study` or `lmadda study --only NAME`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint
from lmadda.core.config import build_config, read_config_file
from lmadda.data.dataset import LoadedImage
from lmadda.data.manifest import Manifest
from lmadda.evaluation.rows import TargetDomain
from lmadda.study.config import ExperimentSpec, StudyConfig
from lmadda.study.grid import ImageSource
from lmadda.study.runner import prepare_manifest


def experiment_parser(description: str, out: str, targets_help: str) -> argparse.ArgumentParser:
    """--config, --experiment, --targets and --out, as every validation bench takes them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="docs/study.yaml")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--targets", nargs="*", help=targets_help)
    parser.add_argument("--out", default=out)
    return parser


def shifted_targets(spec: ExperimentSpec) -> list[str]:
    """The experiment's grid targets that differ from its source: another setting, or the source setting shifted."""
    def shifted(target: str) -> bool:
        domain = TargetDomain.parse(target)
        return domain.setting != spec.source.setting or domain.shift is not None

    return [target for grid in spec.grids for target in grid.targets if shifted(target)]


@dataclass
class StudyExperiment:
    spec: ExperimentSpec
    data: ImageSource
    source: GeneratorCheckpoint
    source_train: list[LoadedImage]  # the source's training inputs, loaded as the study loads them

    @property
    def grid_targets(self) -> list[str]:
        return [target for grid in self.spec.grids for target in grid.targets]


def load_experiment(config: str, name: str) -> StudyExperiment:
    study = build_config(StudyConfig, None, **read_config_file(config)).resolved(Path.cwd())
    spec = next(e for e in study.experiments if e.name == name)
    out = study.out / spec.name
    source = load_checkpoint(out / "models" / "source.pt")
    data = ImageSource(Manifest.load(prepare_manifest(spec, out)), spec.data.validation_rows)
    return StudyExperiment(spec, data, source, data.load(spec.source.setting, "train", percentiles=source.percentiles))
