"""The study config: which experiments `lmadda study` runs and where the document goes.

    title: The study                      # the document's title (its provenance names this config file)
    out: study-out                        # results, models, MLflow store (not committed); failures.json per experiment
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
The whole config is checked when it loads, before any work: source.train, adapt and oracle as the
configs they become, crop sizes against the generator's 2**depth, and (simulated data) every crop
against the fields it is cut from after validation_rows and any scale shift; real images are checked
once indexed, before the source model trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from lmadda.core.config import StrictModel
from lmadda.corrections.baselines import parse_baseline
from lmadda.core.config import LearningRates, describe_validation_error
from lmadda.core.errors import LmaddaError
from lmadda.data.shifts import Shift
from lmadda.evaluation.rows import TargetDomain
from lmadda.selection.selector import DEFAULT_SCORE, SCORES
from lmadda.study.trial import GridPoint
from lmadda.training.adapt import PAPER_RECIPE, AdaptConfig
from lmadda.training.families import FAMILIES, FAMILY_LR
from lmadda.training.source import SourceTrainConfig


class SimulateSpec(StrictModel):
    fields: int = Field(32, ge=12)
    size: int = Field(512, ge=64)
    seed: int = 0


class IndexFolderSpec(StrictModel):
    """`lmadda data index` options, to index a folder of real images in place (nothing is copied)."""

    root: Path
    patterns: list[str] = Field(min_length=1)
    targets: dict[str, str] = Field(default_factory=dict)
    rename: dict[str, str] = Field(default_factory=dict)
    splits: dict[str, str] = Field(default_factory=dict, description="field -> train | val | test (with an acquisition "
                                                                     "group the field is <acquisition>_<field>)")
    split_fractions: tuple[float, float, float] = Field((0.7, 0.15, 0.15), description="train, val, test fractions of the "
                                                                                        "fields `splits` leaves out (per acquisition)")
    acquisition_fractions: dict[str, tuple[float, float, float]] = Field(
        default_factory=dict, description="split fractions of one acquisition, e.g. {ds4: [0.8, 0.2, 0]}")
    seed: int = Field(0, description="seed of the split assignment")
    bit_depth: int | None = Field(None, ge=1, le=32, description="bits the camera used when fewer than the storage type "
                                                                 "(14-bit data in uint16): sets where overexposure saturates")
    pixel_size_um: float | None = Field(None, gt=0)
    focus_round_um: float = Field(1.0, gt=0)
    in_focus: dict[str, float | Literal["median", "min", "max"]] = Field(
        default_factory=dict, description="channel -> the in-focus plane of its focus stacks: a z, or median | min | max "
                                          "(default median)")

    def index_spec(self):
        """The same options as `lmadda.data.index.IndexSpec` (validated here, since a study config is checked before
        any work starts), less the folder."""
        from lmadda.data.index import IndexSpec

        return IndexSpec(**self.model_dump(exclude={"root"}))


class DataSpec(StrictModel):
    simulate: SimulateSpec | None = None
    index: IndexFolderSpec | None = None
    validation_rows: float = Field(0.0, ge=0.0, lt=0.9, description="carve a validation split from the bottom rows of each "
                                                                      "training field (for sets without enough fields)")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.simulate is None) == (self.index is None):
            raise ValueError("give exactly one of data.simulate (the embedded simulated data) or data.index (a folder of real images)")
        return self


class SourceSpec(StrictModel):
    setting: str
    markers: list[str] = Field(min_length=1)
    train: dict = Field(default_factory=dict, description="SourceTrainConfig options (manifest, setting and markers come from here)")


class Grid(StrictModel):
    targets: list[str] = Field(min_length=1, description="setting or setting+shift:magnitude, e.g. phase_contrast+overexposure:2")
    layers: list[int] | Literal["all"] = "all"
    layer_sets: list[list[int]] = Field(default_factory=list, description="multi-layer matching: each set trained as one model")
    lrs: LearningRates = Field(default_factory=lambda: [2e-5])
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    paper_layers: list[int] | Literal["last"] = Field("last", description="layers also adapted with the published recipe "
                                                                            "(recipe: paper); 'last' is ADDA as published")
    families: list[str] = Field(default_factory=lambda: ["lmadda"], min_length=1,
                                description="adaptation families (lmadda.training.families): lmadda at `layers`, the others at "
                                            "`family_layers`, each at its own fixed learning rate")
    family_layers: list[int] = Field(default_factory=lambda: [3], min_length=1, description="cuts of the families other than lmadda")

    @field_validator("families")
    @classmethod
    def _families_known(cls, families: list[str]) -> list[str]:
        unknown = [family for family in families if family not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown adaptation families {unknown}; known: {', '.join(FAMILIES)}")
        return families

    @field_validator("targets")
    @classmethod
    def _targets_parse(cls, targets: list[str]) -> list[str]:
        for target in targets:
            _, _, shift = target.partition("+")
            if shift:
                Shift.parse(shift)
        return targets

    @field_validator("layer_sets")
    @classmethod
    def _sets(cls, layer_sets: list[list[int]]) -> list[list[int]]:
        for layer_set in layer_sets:
            if len(set(layer_set)) < 2:
                raise ValueError(f"layer set {layer_set} needs at least two different layers (single layers go in `layers`)")
        return layer_sets

    def layer_list(self, num_layers: int) -> list[int]:
        layers = list(range(num_layers)) if self.layers == "all" else self.layers
        bad = [layer for layer in layers + [l for s in self.layer_sets for l in s] + self.paper_layer_list(num_layers)
               + self.family_layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the generator has layers 0..{num_layers - 1}")
        return layers

    def paper_layer_list(self, num_layers: int) -> list[int]:
        return [num_layers - 1] if self.paper_layers == "last" else list(self.paper_layers)

    def points_for(self, target: str, seed: int, lr: float, num_layers: int) -> list[GridPoint]:
        """The adapted models of one (target, seed, learning rate) cell: each single layer, each layer set, and, under
        the first learning rate only (the published recipe fixes its own), each paper layer."""
        points = []
        if "lmadda" in self.families:
            points += [GridPoint(target, (layer,), lr, seed) for layer in self.layer_list(num_layers)]
            if lr == self.lrs[0]:
                points += [GridPoint(target, (layer,), PAPER_RECIPE["lr"], seed, "paper") for layer in self.paper_layer_list(num_layers)]
            points += [GridPoint(target, tuple(sorted(layer_set)), lr, seed) for layer_set in self.layer_sets]
        if lr == self.lrs[0]:  # the other families run at their own fixed rate, once
            points += [GridPoint(target, (layer,), FAMILY_LR[family], seed, family=family)
                       for family in self.families if family != "lmadda" for layer in self.family_layers]
        return points

    def points(self, num_layers: int) -> list[GridPoint]:
        """Every adapted model of the grid, seed by seed, learning rate by learning rate, target by target."""
        return [point for seed in self.seeds for lr in self.lrs for target in self.targets
                for point in self.points_for(TargetDomain.parse(target).name, seed, lr, num_layers)]


class CriteriaSpec(StrictModel):
    crops: int = Field(6, ge=2, description="fixed target crops each label-free criterion is measured on")
    crop_size: int = Field(256, ge=16)
    profile_fraction: float = Field(0.5, gt=0, le=1, description="zero-training predictor: first layer reaching this fraction "
                                                                  "of the discrepancy profile's maximum")


class SelectionSpec(StrictModel):
    """The label-free choice among every candidate of a target (lmadda.selection.selector.Selector)."""

    score: Literal[SCORES] = Field(DEFAULT_SCORE, description="what the selector ranks candidates by")
    crops: int = Field(16, ge=4, description="fixed unlabelled target crops the candidates are scored on")
    crop_size: int = Field(128, ge=16, description="crop side; raised to the model multiple 2**depth where smaller")
    min_win_fraction: float = Field(0.75, gt=0.5, le=1.0, description="the chosen model must beat the unadapted one on this "
                                                                       "fraction of the crops, or the choice falls back to it")
    guard: Literal[SCORES] | None = Field(None, description="a second score that must not object: a candidate worse than "
                                                             "the unadapted model on it on most crops is passed over")
    min_gain: float = Field(0.25, ge=0, description="and remove this fraction of the unadapted model's excess over the "
                                                     "source's own level (the whole score for consensus)")

    def options(self) -> dict:
        return self.model_dump()


class ExperimentSpec(StrictModel):
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
    robust: dict | None = Field(None, description="SourceTrainConfig options of the robust source model: the source model "
                                                  "fine-tuned with imaging-nuisance augmentation (`augment`, "
                                                  "lmadda.data.augment; its defaults when omitted); omit for none")
    criteria: CriteriaSpec = CriteriaSpec()
    selection: SelectionSpec = SelectionSpec()

    @model_validator(mode="after")
    def _typed_options(self) -> "ExperimentSpec":
        """source.train, adapt and oracle are checked as the configs they become, before any work is done."""
        self.source_train_config()
        self.adapt_config()
        self.oracle_config()
        self.robust_config()
        if self.adapt.get("stop_on_collapse") is False:
            raise ValueError(f"experiment {self.name}: adapt.stop_on_collapse: a grid point ends where it collapses "
                             "(lmadda.study.trial.run_trial), so it cannot be turned off here; remove it")
        num_layers = self.source_train_config().generator_config().num_layers
        for grid in self.grids:
            try:
                grid.layer_list(num_layers)
            except ValueError as error:
                raise ValueError(f"experiment {self.name}: {error} (depth {num_layers // 2}); list layers of that range "
                                 "or set source.train.depth") from None
        if self.data.simulate is not None:
            size = self.data.simulate.size
            self.check_field_size(size, size)
        else:
            self.check_crop_multiples()
        return self

    def _typed(self, model: type[BaseModel], where: str, options: dict):
        try:
            return model.model_validate(options)
        except ValidationError as error:
            raise ValueError(describe_validation_error(error, model, f"experiment {self.name}: {where}")) from None

    def source_train_config(self, manifest: Path = Path("manifest.parquet")) -> SourceTrainConfig:
        taken = {"manifest", "setting", "markers"} & set(self.source.train)
        if taken:
            raise ValueError(f"experiment {self.name}: source.train.{sorted(taken)[0]} comes from the experiment "
                             "(data and source.setting/markers); remove it from source.train")
        options = {**self.source.train, "manifest": manifest, "setting": self.source.setting, "markers": self.source.markers}
        return self._typed(SourceTrainConfig, "source.train", options)

    def adapt_config(self) -> AdaptConfig:
        return self._typed(AdaptConfig, "adapt", {**self.adapt, "layer": [0]})

    def oracle_config(self) -> SourceTrainConfig | None:
        return self._from_source("oracle", self.oracle, "the oracle is the source model fine-tuned on each target's pairs")

    def robust_config(self) -> SourceTrainConfig | None:
        """The robust source model's training: the source's options, then `robust`'s, with the augmentation on."""
        return self._from_source("robust", self.robust, "the robust model is the source model fine-tuned on augmented source "
                                 "pairs", {"augment": {}})

    def _from_source(self, where: str, options: dict | None, what: str, defaults: dict | None = None) -> SourceTrainConfig | None:
        """A model fine-tuned from the source model (the oracle, the robust model): the source's training options, then
        `defaults`, then its own; what makes it the source's fine-tuning is fixed."""
        if options is None:
            return None
        fixed = {"manifest", "setting", "markers", "shift", "init_from", "ngf", "depth"} & set(options)
        if fixed:
            raise ValueError(f"experiment {self.name}: {where}.{sorted(fixed)[0]} is fixed: {what}; remove it from {where} "
                             "(set ngf/depth in source.train)")
        return self._typed(SourceTrainConfig, where, {**self.source_train_config().model_dump(), **(defaults or {}), **options})

    @property
    def multiple(self) -> int:
        """Crops must be multiples of this: 2**depth of the source generator."""
        return self.source_train_config().generator_config().multiple

    def _crops(self) -> dict[str, tuple[int, int]]:
        """option -> (crop size, the smallest it may be)."""
        m = self.multiple
        crops = {"source.train.crop_size": (self.source_train_config().crop_size, m),
                 "adapt.crop_size": (self.adapt_config().crop_size, m),
                 "criteria.crop_size": (self.criteria.crop_size, m * math.ceil(16 / m))}
        if self.oracle is not None:
            crops["oracle.crop_size"] = (self.oracle_config().crop_size, m)
        return crops

    def check_crop_multiples(self) -> None:
        m = self.multiple
        for option, (crop, lowest) in self._crops().items():
            if crop % m:
                suggestion = max(lowest, crop // m * m)
                raise ValueError(f"experiment {self.name}: {option} {crop} is not a multiple of {m} (2**depth of the source "
                                 f"generator, depth {int(math.log2(m))}); use {option} {suggestion}")

    def _scales(self) -> dict[str, float]:
        """Target -> how much it scales images (a scale shift below 1 shrinks the fields)."""
        scales = {}
        for grid in self.grids:
            for target in grid.targets:
                _, _, shift = target.partition("+")
                parsed = Shift.parse(shift) if shift else None
                scales[target] = parsed.magnitude if parsed is not None and parsed.name == "scale" else 1.0
        return scales

    def check_field_size(self, height: int, width: int, data: str | None = None) -> None:
        """Every crop fits every image it is cut from: the training rows and width (and the validation rows, with
        data.validation_rows) of the source and of each target, after any scale shift. `data` names real images."""
        self.check_crop_multiples()
        m, fraction = self.multiple, self.data.validation_rows
        val_rows = int(round(height * fraction))
        crops = self._crops()
        areas = [("train", height - val_rows, "training rows" if fraction else "height"), ("width", width, "width")]
        if fraction:
            areas.append(("val", val_rows, "validation rows"))
        fits: dict[str, list[tuple[int, str, str, float]]] = {option: [] for option in crops}  # (pixels, area, whose, scale)
        for option in crops:
            for target, scale in {"": 1.0, **self._scales()}.items():
                if option == "adapt.crop_size" and not target or option == "source.train.crop_size" and target:
                    continue
                for area, extent, what in areas:
                    if area == "val" and option in ("adapt.crop_size", "criteria.crop_size"):
                        continue  # adaptation and the criteria crop training fields only
                    fits[option].append((int(round(extent * scale)), area,
                                         f"{what} of {'target ' + target if target else 'the source'}", scale))
        for option, (crop, lowest) in crops.items():
            px, _, what, scale = min(fits[option])
            if px >= crop:
                continue
            fix = [f"use {option} {px // m * m}"] if px // m * m >= lowest else []
            if self.data.simulate is not None:  # a size at which every crop fits, not only this one
                size = max(_smallest_size(crops[o][0], area, s, fraction) for o in crops for _, area, _, s in fits[o])
                fix.append(f"use fields of at least {size} px (data.simulate.size: {size})")
            else:
                fix.append("leave that target out" if scale < 1 else "larger images")
            given = f"data.simulate.size {height}" if data is None else f"{data}: {height} x {width} px"
            shrink = f", shrunk by its scale:{scale:g} shift" if scale < 1 else ""
            rows = f", data.validation_rows {fraction:g}" if fraction and "rows" in what else ""
            raise ValueError(f"experiment {self.name}: the {what} {'are' if 'rows' in what else 'is'} {px} px "
                             f"({given}{rows}{shrink}), fewer than {option} {crop}; {' or '.join(fix)}")

    @field_validator("baselines")
    @classmethod
    def _known(cls, baselines: list[str]) -> list[str]:
        for name in baselines:
            try:
                _, base, _ = parse_baseline(name)
            except LmaddaError as error:
                raise ValueError(str(error)) from None
            if base == "unadapted":
                raise ValueError("baselines: the unadapted model is always measured; remove 'unadapted'")
        return baselines

    @field_validator("adapt")
    @classmethod
    def _no_grid_keys(cls, adapt: dict) -> dict:
        taken = {"layer", "lr", "seed"} & set(adapt)
        if taken:
            raise ValueError(f"adapt.{sorted(taken)[0]} is set by the grids; remove it from adapt")
        return adapt


def _smallest_size(crop: int, area: str, scale: float, validation_rows: float) -> int:
    """The smallest square field (a multiple of 8; data.simulate allows 64 px up) whose `area` holds `crop` after scaling by `scale`."""
    def extent(size: int) -> int:
        val_rows = int(round(size * validation_rows))
        return {"train": size - val_rows, "width": size, "val": val_rows}[area]

    size = max(64, math.ceil(crop / scale / 8) * 8)
    while int(round(extent(size) * scale)) < crop:
        size += 8
    return size


class StudyConfig(StrictModel):
    title: str = Field("The study: LM-ADDA on simulated and real data", description="the document's title")
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
