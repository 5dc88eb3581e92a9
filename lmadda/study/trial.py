"""One grid point, adapted and measured: the grid point and the trial function the study and the sweep both run.

A grid point (`GridPoint`, expanded from the one grid spec `lmadda.study.config.Grid`) is LM-ADDA of
the source model at some layer(s), learning rate and seed, on one target domain. `run_trial` steps an `Adapter` to its end (its last step, or the first step flagged collapsed:
a collapse ends the point, whatever `stop_on_collapse` says), then measures the adapted model once:

- on the target's labelled test images, where they exist: one row per image x marker in the one
  result-row schema (`lmadda.evaluation.rows`), tagged with the point;
- by the label-free criteria on fixed unlabelled target crops (`lmadda.selection.criteria.SelectionProbe`).

The study runs it in its own process (`lmadda.study.grid.run_grid`); the sweep runs it in a Ray Tune
trial or as rank 0 of a Ray Train worker group (`lmadda_tune.train_workers`), with the Adapter's
distributed hooks and an `on_record` that reports to Ray and keeps the loop state. What each keeps of
the result (the study its probe predictions, the sweep the generator file) is the caller's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping

import numpy as np

from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import LoadedImage
from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.core.registry_names import alias_for
from lmadda.evaluation.rows import CRITERION_PREFIX, TargetDomain, adaptation_method, matched_name, tag_rows
from lmadda.selection.criteria import SelectionProbe
from lmadda.training.adapt import PAPER_RECIPE, AdaptConfig, AdaptResult, run_steps
from lmadda.training.families import MOMENT_OPTIONS, FamilyConfig, Loop, check_family, family_config

# The options the published recipe fixes (lmadda.training.adapt.PAPER_RECIPE): a paper point drops them from the
# grid's shared adaptation options, so the recipe's own values hold.
PAPER_FIXED = (*PAPER_RECIPE, "recipe")


@dataclass(frozen=True)
class GridPoint:
    """One adapted model of a grid: LM-ADDA of the source model on `target` (a target domain's name) matching
    `layers`, at learning rate `lr`, from `seed`; `recipe` paper is ADDA as published at those layers (its
    learning rate is the recipe's)."""

    target: str
    layers: tuple[int, ...]
    lr: float
    seed: int
    recipe: Literal["lmadda", "paper"] = "lmadda"
    family: str = "lmadda"  # lmadda.training.families: what trains layers 0..l (LM-ADDA, moments, self-training, ...)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GridPoint:
        """A point from `as_dict` (a Ray Tune trial's config); a grid point of an older lmadda is refused."""
        if "target" not in values:
            raise LmaddaError(f"grid point {dict(values)} was written by an older lmadda (no target): finish that sweep with the "
                              "lmadda version that started it, or run it again under a new name")
        return cls(values["target"], tuple(values["layers"]), float(values["lr"]), int(values["seed"]), values.get("recipe", "lmadda"),
                   check_family(values.get("family", "lmadda")))

    def as_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @property
    def domain(self) -> TargetDomain:
        return TargetDomain.parse(self.target)

    @property
    def matched(self) -> str:
        return matched_name(self.layers)

    def method(self, last_layer: int) -> str:
        """Its result rows' method: LM-ADDA's own names (`adaptation_method`), or the other family's name."""
        return adaptation_method(self.layers, last_layer, self.recipe) if self.family == "lmadda" else self.family

    @property
    def key(self) -> str:
        """Its name: a sweep trial's store folder and its reports' `point` (e.g. bright_field-L3-lr2e-05-s0)."""
        paper = "-paper" if self.recipe == "paper" else ""
        family = "" if self.family == "lmadda" else f"-{self.family.replace('+', '-')}"
        return f"{alias_for(self.target)}-L{self.matched}-lr{self.lr:g}-s{self.seed}{paper}{family}"

    def adapt_options(self, shared: Mapping[str, Any]) -> dict[str, Any]:
        """Its AdaptConfig options: the grid's `shared` ones (the published recipe's own values over them for a
        paper point), then its layers, learning rate and seed (and, for moment matching, its adversary). A
        self-training point has no AdaptConfig: `config` builds its SelfTrainConfig."""
        if self.family not in ("lmadda", "moments"):
            raise LmaddaError(f"grid point {self.key}: family {self.family} is not an AdaptConfig family; the sweep runs "
                              "lmadda and moments (self-training runs in the study and in `adapt --layer auto`)")
        if self.recipe == "paper":
            return {**{k: v for k, v in shared.items() if k not in PAPER_FIXED}, "recipe": "paper", "layer": list(self.layers),
                    "seed": self.seed}
        extra = MOMENT_OPTIONS if self.family == "moments" else {}
        return {**shared, "layer": list(self.layers), "lr": self.lr, "seed": self.seed, **extra}

    def config(self, shared: Mapping[str, Any]) -> FamilyConfig:
        """Its validated config: an AdaptConfig (LM-ADDA, moments) or a SelfTrainConfig, from the grid's shared options."""
        if self.family in ("lmadda", "moments"):
            return AdaptConfig.model_validate(self.adapt_options(shared))
        return family_config(self.family, shared, max(self.layers), self.seed, self.lr)

    def tags(self, last_layer: int) -> dict:
        """Its identity in the result rows."""
        return dict(method=self.method(last_layer), layer=max(self.layers), matched=self.matched, lr=self.lr, seed=self.seed)


@dataclass
class TrialTarget:
    """What a grid point is measured on: the target domain, its labelled test images (None: the target has no
    labels, only the label-free criteria can judge it) and the label-free probe (None: no criteria)."""

    domain: TargetDomain
    markers: list[str]
    test_images: list[LoadedImage] | None = None
    probe: SelectionProbe | None = None


@dataclass
class TrialResult:
    adapted: AdaptResult
    last_record: dict  # the loop's last log record (its `steps_s` is the time spent inside steps)
    rows: list[dict] = field(default_factory=list)  # one per test image x marker, tagged; empty without labels
    criteria: dict[str, float] = field(default_factory=dict)  # lf_<name> on the probe's crops
    probe_prediction: np.ndarray | None = None  # the adapted model's stains of the probe's crops


def run_trial(adapter: Loop, target: TrialTarget, tags: dict, *, on_record: Callable[[dict], None] | None = None,
              steps_s: float = 0.0) -> TrialResult:
    """Adapt to the end (`on_record` sees every log record but the last), then measure the adapted model.

    `tags`: the point's identity in the result rows (method, layer, matched, lr, seed, ...); the adaptation's
    own outcome (collapsed, d_saturated, g_updates, seconds) is added here. `steps_s`: time a resumed point
    had spent inside steps before."""
    started = time.perf_counter()
    last = run_steps(adapter, on_record, end_on_collapse=True, steps_s=steps_s)
    adapted = adapter.finish()
    adapted.seconds = time.perf_counter() - started
    result = TrialResult(adapted, last)
    if target.probe is not None:
        criteria, result.probe_prediction = target.probe.measure(adapted.generator, adapted.input_correction)
        result.criteria = {f"{CRITERION_PREFIX}{name}": value for name, value in criteria.items()}
    if target.test_images:
        rows = evaluate_generator(adapted.generator, target.test_images, target.markers, input_transform=adapted.input_correction)
        outcome = dict(collapsed=adapted.collapsed, d_saturated=adapted.d_saturated, g_updates=adapted.g_updates,
                       seconds=adapted.seconds)
        result.rows = tag_rows([{**row, **result.criteria} for row in rows], target.domain, **{**tags, **outcome})
    return result
