"""The study config: which experiments `lmadda study` runs and where the document goes.

    out: study-out                        # results, models, MLflow store (not committed)
    document: docs/study.md               # regenerated from the MLflow results
    figures: docs/study                   # small PNGs beside it (committed)
    experiments:
      - name: simulated
        data: {simulate: {fields: 32, size: 512, seed: 0}}
        source: {setting: phase_contrast, markers: [dapi, cd29], train: {epochs: 16}}
        grids:
          - {targets: [bright_field, phase_contrast+overexposure:2], layers: all, lrs: [2.0e-5, 1.0e-4], seeds: [0, 1]}
        adapt: {steps: 80}
        oracle: {epochs: 2}              # fine-tuned from the source model on target pairs; omit for none

Relative paths are taken from the directory `lmadda study` runs in (the repository root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmadda.baselines import BASELINES
from lmadda.data.shifts import Shift


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SimulateSpec(_Strict):
    fields: int = Field(32, ge=12)
    size: int = Field(512, ge=64)
    seed: int = 0


class IndexFolderSpec(_Strict):
    """`lmadda data index` options, to index a folder of real images in place (nothing is copied)."""

    root: Path
    patterns: list[str] = Field(min_length=1)
    targets: dict[str, str] = Field(default_factory=dict)
    rename: dict[str, str] = Field(default_factory=dict)
    splits: dict[str, str] = Field(default_factory=dict)
    focus_round_um: float = Field(1.0, gt=0)


class DataSpec(_Strict):
    simulate: SimulateSpec | None = None
    index: IndexFolderSpec | None = None
    validation_rows: float = Field(0.0, ge=0.0, lt=0.9, description="carve a validation split from the bottom rows of each "
                                                                      "training field (for sets without enough fields)")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.simulate is None) == (self.index is None):
            raise ValueError("give exactly one of data.simulate (the embedded simulated data) or data.index (a folder of real images)")
        return self


class SourceSpec(_Strict):
    setting: str
    markers: list[str] = Field(min_length=1)
    train: dict = Field(default_factory=dict, description="SourceTrainConfig options (manifest, setting and markers come from here)")


class Grid(_Strict):
    targets: list[str] = Field(min_length=1, description="setting or setting+shift:magnitude, e.g. phase_contrast+overexposure:2")
    layers: list[int] | Literal["all"] = "all"
    layer_sets: list[list[int]] = Field(default_factory=list, description="multi-layer matching: each set trained as one model")
    lrs: list[float] = Field(default_factory=lambda: [2e-5], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("targets")
    @classmethod
    def _targets_parse(cls, targets: list[str]) -> list[str]:
        for target in targets:
            _, _, shift = target.partition("+")
            if shift:
                Shift.parse(shift)
        return targets

    @field_validator("lrs")
    @classmethod
    def _positive(cls, lrs: list[float]) -> list[float]:
        if any(lr <= 0 for lr in lrs):
            raise ValueError(f"learning rates must be positive, got {lrs}")
        return lrs

    @field_validator("layer_sets")
    @classmethod
    def _sets(cls, layer_sets: list[list[int]]) -> list[list[int]]:
        for layer_set in layer_sets:
            if len(set(layer_set)) < 2:
                raise ValueError(f"layer set {layer_set} needs at least two different layers (single layers go in `layers`)")
        return layer_sets

    def layer_list(self, num_layers: int) -> list[int]:
        layers = list(range(num_layers)) if self.layers == "all" else self.layers
        bad = [layer for layer in layers + [l for s in self.layer_sets for l in s] if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the generator has layers 0..{num_layers - 1}")
        return layers


class CriteriaSpec(_Strict):
    crops: int = Field(6, ge=2, description="fixed target crops each label-free criterion is measured on")
    crop_size: int = Field(256, ge=16)
    profile_fraction: float = Field(0.5, gt=0, le=1, description="zero-training predictor: first layer reaching this fraction "
                                                                  "of the discrepancy profile's maximum")


class ExperimentSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    title: str
    about: str = Field("", description="a paragraph for the document: the data, the protocol, what it can show")
    data: DataSpec
    source: SourceSpec
    grids: list[Grid] = Field(min_length=1)
    adapt: dict = Field(default_factory=dict, description="AdaptConfig options except layer, lr and seed")
    baselines: list[str] = Field(default_factory=lambda: ["adabn", "histogram_matching", "fda"])
    oracle: dict | None = Field(None, description="SourceTrainConfig options of the oracle, fine-tuned from the source model "
                                                  "on target pairs (the first seed only); omit for none")
    criteria: CriteriaSpec = CriteriaSpec()

    @field_validator("baselines")
    @classmethod
    def _known(cls, baselines: list[str]) -> list[str]:
        unknown = set(baselines) - set(BASELINES) | ({"unadapted"} & set(baselines))
        if unknown:
            raise ValueError(f"unknown baseline(s) {sorted(unknown)}; known: {', '.join(b for b in BASELINES if b != 'unadapted')}")
        return baselines

    @field_validator("adapt")
    @classmethod
    def _no_grid_keys(cls, adapt: dict) -> dict:
        taken = {"layer", "lr", "seed"} & set(adapt)
        if taken:
            raise ValueError(f"adapt.{sorted(taken)[0]} is set by the grids; remove it from adapt")
        return adapt


class StudyConfig(_Strict):
    out: Path = Path("study-out")
    document: Path = Path("docs/study.md")
    figures: Path = Path("docs/study")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite in `out`")
    experiments: list[ExperimentSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "StudyConfig":
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment names must be unique, got {names}")
        return self

    def resolved(self, base: Path) -> "StudyConfig":
        """Absolute paths (MLflow's SQLite URI needs one)."""
        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else (base / path).resolve()

        experiments = []
        for experiment in self.experiments:
            data = experiment.data
            if data.index is not None:
                data = data.model_copy(update={"index": data.index.model_copy(update={"root": absolute(data.index.root)})})
            experiments.append(experiment.model_copy(update={"data": data}))
        out = absolute(self.out)
        return self.model_copy(update={
            "out": out, "document": absolute(self.document), "figures": absolute(self.figures), "experiments": experiments,
            "tracking_uri": self.tracking_uri or f"sqlite:///{out / 'mlflow.db'}",
        })
