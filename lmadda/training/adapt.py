"""LM-ADDA: adapt a source generator to a new microscope setting by matching one layer, without pairs.

    G   the source generator, frozen
    G'  a copy of G; only layers 0..l train, layers after l stay frozen (weights and BatchNorm
        statistics), so G' = G's own decoder tail on top of an adapted head
    D   a feature discriminator on layer l: G_l(x) for source images x is "real",
        G'_l(x') for unlabelled target images x' is "fake"

Each step (ADDA, Tzeng et al. 2017): update D to separate the two, then update G' with inverted
labels so that its layer-l features look like source features. ADDA is matching the last layer.

What crosses the cut. In a UNet, layers 0..l also produce skip tensors that feed the frozen layers
after l. `match="activation"` (default, the paper's method) matches only the layer-l activation; the
skips G' produces follow from the same trained weights but are not matched themselves.
`match="cut"` matches every tensor crossing the cut (the activation and each pending skip, one
discriminator each), so the frozen tail sees source-like inputs on all of its inputs.

Multi-layer matching (`layer: [3, 7]`, optional `layer_weights`) trains layers 0..max and matches the
activation of each listed layer; the paper reports that one layer beats several, and this makes
that comparison runnable.

Recipes. `recipe: paper` is ADDA as published (Tzeng 2017) moved to layer l: one Adam setting for G'
and D, G' updated at every step, nothing else. `recipe: lmadda` (default) adds this project's
stabilisers, each an option measured in docs/method.md: a slower G' than D (TTUR), a D warm-up, an
accuracy gate that holds G' still while D cannot tell the domains apart, and a source anchor that
keeps what G' sends across the cut for *source* images equal to what G sends, a label-free guard
against the drift that lets G' fool D by erasing the stain.

Cost: the target branch runs only layers 0..l and the source branch runs them under `no_grad`, so a
step at an early layer is much cheaper than a step at the last.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.core.device import resolve_device
from lmadda.core.errors import LmaddaError
from lmadda.core.progress import Progress
from lmadda.data.correction import HistogramMatcher
from lmadda.data.dataset import LoadedImage, UnpairedCrops
from lmadda.domain import DomainReference, reference_from_images
from lmadda.models.discriminators import FeatureDiscriminator
from lmadda.models.generator import CutState, UNetGenerator, init_weights
from lmadda.evaluation.rows import adda_or_lmadda
from lmadda.training.common import autocast_for, endless, seed_everything


# ADDA as published (Tzeng et al. 2017): one Adam setting for both players, G' updated at every step.
PAPER_RECIPE = {"adversary": "discriminator", "lr": 2e-4, "d_lr": None, "gate_accuracy": None, "d_warmup_steps": 0, "source_anchor": 0.0, "input_correction": None}


class AdaptConfig(BaseModel):
    """Options of `lmadda adapt`, with the documented defaults."""

    model_config = ConfigDict(extra="forbid")

    recipe: Literal["lmadda", "paper"] = Field("lmadda", description="paper: ADDA as published at layer l (no gate, no warm-up, "
                                                                      "no anchor, G' and D at 2e-4); lmadda: the measured stabilisers")
    layer: list[int] = Field(description="matched layer(s), 0..2*depth-1; the last layer is ADDA")
    layer_weights: list[float] | None = Field(None, description="weights of the matched layers (multi-layer matching)")
    adversary: Literal["discriminator", "moments"] = Field("discriminator", description="what tells the domains apart at the "
                                                                                         "cut: a discriminator D (ADDA), or their "
                                                                                         "per-channel mean and covariance (CORAL-style "
                                                                                         "moment matching, no adversary)")
    match: Literal["activation", "cut"] = Field("activation", description="match the layer activation only, or every tensor crossing the cut")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(4, ge=1)
    crop_size: int = Field(256, ge=4)
    # Defaults measured on the simulated data (docs/method.md): with G' at pix2pix's 2e-4 and no gate,
    # Adam moved every trained weight by ~lr per step even when D was at chance, and deep cuts
    # destroyed the output; a 10x slower G', a faster D and the accuracy gate keep G' still until D
    # has something to say.
    lr: float = Field(2e-5, gt=0, description="learning rate of G'")
    d_lr: float | None = Field(2e-4, gt=0, description="learning rate of D (TTUR when higher than lr); None: same as lr")
    beta1: float = Field(0.5, ge=0, lt=1)
    d_width: int = Field(32, ge=1)
    spectral_norm: bool = Field(False, description="spectral normalisation on D's layers")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="one-sided: D's 'source' label is 1 - this")
    gate_accuracy: float | None = Field(0.6, ge=0.5, le=1.0, description="update G' only while D's running accuracy is at least this (0.6 as in pytorch-adapt); None: always")
    d_warmup_steps: int = Field(10, ge=0, description="D-only steps before G' starts to move")
    input_correction: Literal["histogram_matching"] | None = Field(None, description="correct target inputs first (histogram "
                                                                                  "matching onto the source), then match features; "
                                                                                  "the checkpoint carries the correction")
    source_anchor: float = Field(0.0, ge=0, description="weight of an L1 term keeping G'(x) = G(x) across the cut for source "
                                                        "images x (0: off); a label-free guard against drift")
    bn_mode: Literal["frozen", "train"] = Field("frozen", description="BatchNorm of the trained layers: keep source statistics, or re-estimate them on target batches")
    log_every: int = Field(10, ge=1)
    collapse_g_loss: float = Field(20.0, gt=0, description="generator loss above this (or non-finite) marks the run collapsed")
    saturation_accuracy: float = Field(0.99, gt=0.5, le=1.0)
    saturation_patience: int = Field(5, ge=1, description="logs in a row with D accuracy >= saturation_accuracy mark D saturated")
    saturation_collapses: bool = Field(False, description="a saturated D also marks the run collapsed (the paper's rule for "
                                                          "which learning rates to keep; sweeps turn it on); off: only flagged")
    stop_on_collapse: bool = True
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast of the forward passes (weights stay fp32)")

    @field_validator("layer", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, int) else value

    @model_validator(mode="before")
    @classmethod
    def _paper_recipe(cls, values):
        """`recipe: paper` fixes the stabilisers off; setting one of them as well is a contradiction, not a tweak."""
        if not isinstance(values, dict) or values.get("recipe") != "paper":
            return values
        clash = sorted(k for k in PAPER_RECIPE if k != "lr" and k in values and values[k] != PAPER_RECIPE[k])
        if clash:
            raise ValueError(f"recipe 'paper' is ADDA as published and fixes {', '.join(clash)}; "
                             "remove them, or use recipe 'lmadda' to set them")
        return {**PAPER_RECIPE, **values}

    @model_validator(mode="after")
    def _weights_match_layers(self) -> "AdaptConfig":
        if not self.layer:
            raise ValueError("layer: give at least one layer")
        if len(set(self.layer)) != len(self.layer):
            raise ValueError(f"layer: {self.layer} lists a layer twice")
        if self.layer_weights is not None and len(self.layer_weights) != len(self.layer):
            raise ValueError(f"layer_weights has {len(self.layer_weights)} values for {len(self.layer)} layers")
        return self

    @property
    def cut(self) -> int:
        return max(self.layer)


@dataclass
class AdaptResult:
    generator: UNetGenerator
    history: list[dict] = field(default_factory=list)
    collapsed: bool = False
    collapse_reason: str = ""
    d_saturated: bool = False
    steps_done: int = 0
    # G' steps taken: the gate holds G' still while D cannot tell the domains apart, so 0 means the
    # adapted model is the source model (D found nothing to match within the steps given)
    g_updates: int = 0
    seconds: float = 0.0
    input_correction: HistogramMatcher | None = None  # applied to target inputs before G' (config.input_correction)
    domain_reference: DomainReference | None = None  # the target domain as G' sees it (lmadda.domain)
    method: str = ""  # the family that made it, when not LM-ADDA (e.g. self_training)

    def checkpoint(self, source: GeneratorCheckpoint, config: BaseModel, target_setting: str, **extra) -> GeneratorCheckpoint:
        """The adapted model as a checkpoint; `config` is the AdaptConfig (or another family's config) that made it."""
        method = self.method or adapted_method_name(config, self.generator.last_layer)
        metadata = {
            "method": method, "recipe": getattr(config, "recipe", None), "layer": config.layer[0] if len(config.layer) == 1 else list(config.layer),
            "adapt_config": config.model_dump(mode="json"), "collapsed": self.collapsed,
            "collapse_reason": self.collapse_reason, "d_saturated": self.d_saturated,
            "steps_done": self.steps_done, "g_updates": self.g_updates, "source_setting": source.setting,
            "source_metadata": {k: v for k, v in source.metadata.items() if k != "history"}, **extra,
        }
        if self.input_correction is not None:
            metadata["input_correction"] = self.input_correction.as_correction()
        return GeneratorCheckpoint(
            generator=self.generator, markers=source.markers, setting=target_setting,
            percentiles=source.percentiles, target_norm=source.target_norm, target_dtype=source.target_dtype, metadata=metadata,
            domain_reference=dataclasses.replace(self.domain_reference, domain=target_setting) if self.domain_reference else None,
        )


def matched_features(generator: UNetGenerator, x: torch.Tensor, config: AdaptConfig) -> dict[str, torch.Tensor]:
    """The tensors D compares, by name: 'layer<l>' for each matched layer (+ 'skip<i>' with match='cut')."""
    return features_of(cut_state(generator, x, config), config)


def cut_state(generator: UNetGenerator, x: torch.Tensor, config: AdaptConfig) -> CutState:
    """Layers 0..cut of `generator` on `x`, recording the other matched layers."""
    return generator.forward_to(config.cut, x, record=tuple(l for l in config.layer if l != config.cut))


def features_of(state: CutState, config: AdaptConfig) -> dict[str, torch.Tensor]:
    others = tuple(l for l in config.layer if l != config.cut)
    features = {f"layer{config.cut}": state.activation}
    features.update({f"layer{l}": state.recorded[l] for l in others})
    if config.match == "cut":
        features.update({f"skip{i}": t for i, t in state.skips.items()})
    return features


def adapted_method_name(config: "AdaptConfig", last_layer: int) -> str:
    """How a checkpoint names an adapted model: `moments` (statistics matching), `adda` (the last layer), `lmadda`."""
    if config.adversary == "moments":
        return "moments"
    return adda_or_lmadda(config.layer, last_layer)


def moment_gap(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CORAL-style distance between two batches of feature maps (B, C, H, W): the squared distance of their
    per-channel means plus that of their channel covariances (Sun & Saenko 2016, / 4 C^2), every position
    of every map one sample. Zero when the two batches share first and second moments."""
    channels = source.shape[1]
    a = source.transpose(0, 1).reshape(channels, -1).float()
    b = target.transpose(0, 1).reshape(channels, -1).float()
    mean_a, mean_b = a.mean(dim=1, keepdim=True), b.mean(dim=1, keepdim=True)
    cov_a = (a - mean_a) @ (a - mean_a).T / max(a.shape[1] - 1, 1)
    cov_b = (b - mean_b) @ (b - mean_b).T / max(b.shape[1] - 1, 1)
    return ((mean_a - mean_b) ** 2).mean() + ((cov_a - cov_b) ** 2).sum() / (4 * channels**2)


def discriminator_loss(discriminators: nn.Module, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                       weights: dict[str, float], real_label: float = 1.0) -> tuple[torch.Tensor, float]:
    """ADDA's L_adv_D: binary cross-entropy of D calling source features real (`real_label`, below 1 with label
    smoothing) and adapted target features fake, weighted over the matched tensors; and D's accuracy. Target features
    are detached: this loss trains D only. One forward over both batches, since a DDP-wrapped D allows one forward
    per backward."""
    bce = nn.functional.binary_cross_entropy_with_logits
    batch = next(iter(source.values())).shape[0]
    logits = discriminators({name: torch.cat([source[name], target[name].detach()]) for name in weights})
    loss = torch.zeros((), device=logits[next(iter(weights))].device)
    accuracy = 0.0
    for name, weight in weights.items():
        logits_source, logits_target = logits[name][:batch], logits[name][batch:]
        loss = loss + weight * (bce(logits_source, torch.full_like(logits_source, real_label))
                                + bce(logits_target, torch.zeros_like(logits_target)))
        accuracy += weight * 0.5 * ((logits_source > 0).float().mean() + (logits_target < 0).float().mean()).item()
    return loss, accuracy


def generator_loss(discriminators: nn.Module, target: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """ADDA's L_adv_M with inverted labels (the GAN loss of Goodfellow et al.): G' is rewarded when D calls its target
    features source."""
    bce = nn.functional.binary_cross_entropy_with_logits
    logits = discriminators({name: target[name] for name in weights})
    loss = torch.zeros((), device=logits[next(iter(weights))].device)
    for name, weight in weights.items():
        loss = loss + weight * bce(logits[name], torch.ones_like(logits[name]))
    return loss


def moment_loss(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Statistics matching in place of D: the weighted CORAL-style gap (`moment_gap`) of each matched tensor."""
    return sum(weight * moment_gap(source[name], target[name]) for name, weight in weights.items())


def anchor_loss(adapted_on_source: dict[str, torch.Tensor], source_reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """L1 between what G' and G do to the same source images at the cut, averaged over the cut's tensors."""
    return torch.stack([(adapted_on_source[n] - source_reference[n]).abs().mean() for n in source_reference]).mean()


class MatchedFeatures(nn.Module):
    """The generator up to the cut as a module whose forward() returns the matched tensors.

    DDP synchronises gradients through forward(), so the trained part of G' is wrapped in this rather
    than called through `forward_to`; only layers 0..cut take part, so no parameter goes unused.
    """

    def __init__(self, generator: UNetGenerator, config: AdaptConfig):
        super().__init__()
        self.generator = generator
        self.config = config

    def forward(self, x: torch.Tensor, anchor: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The matched features of `x`, and every tensor crossing the cut for the source batch `anchor`.

        Both batches go through one forward (DDP allows one forward per backward). G' runs in eval
        mode, so joining them changes nothing, except that with bn_mode 'train' the anchor's source
        images join the BatchNorm batch.
        """
        if anchor is None:
            return matched_features(self.generator, x, self.config), {}
        batch = x.shape[0]
        state = cut_state(self.generator, torch.cat([x, anchor]), self.config)
        features = features_of(state, self.config)
        return {n: t[:batch] for n, t in features.items()}, {n: t[batch:] for n, t in state.tensors().items()}


class FeatureDiscriminators(nn.ModuleDict):
    """One feature discriminator per matched tensor; forward() maps a dict of features to a dict of logits."""

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {name: self[name](tensor) for name, tensor in features.items()}


def feature_weights(config: AdaptConfig, names: list[str]) -> dict[str, float]:
    """Layer weights as given (default equal); skip tensors share their cut layer's weight equally."""
    given = dict(zip(config.layer, config.layer_weights or [1.0] * len(config.layer)))
    weights = {f"layer{l}": w for l, w in given.items()}
    skips = [n for n in names if n.startswith("skip")]
    if skips:
        share = weights[f"layer{config.cut}"] / (len(skips) + 1)
        weights[f"layer{config.cut}"] = share
        weights.update({n: share for n in skips})
    total = sum(weights.values())
    return {n: weights[n] / total for n in names}


def _prepare_target_generator(source: UNetGenerator, config: AdaptConfig) -> tuple[UNetGenerator, list[nn.Parameter]]:
    """G' = copy of G; layers 0..cut trainable, later layers frozen with frozen BatchNorm statistics."""
    target = copy.deepcopy(source)
    target.eval()  # all BatchNorm uses running statistics and dropout is off, unless bn_mode says otherwise
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    trainable = target.layer_parameters(config.cut)
    for parameter in trainable:
        parameter.requires_grad_(True)
    if config.bn_mode == "train":
        for layer in target.layers[: config.cut + 1]:
            for module in layer.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.train()
    return target, trainable


Prepare = Callable[[nn.Module], nn.Module]
SamplerFactory = Callable[[object, int], object]
Reduce = Callable[[list[float]], list[float]]  # mean over workers


class Adapter:
    """The LM-ADDA loop, step by step, with the hooks distributed training needs.

    `prepare` wraps the trained modules (e.g. in DDP), `sampler_factory` shards the crops across
    workers, `reduce` averages the scalars that steer the loop (D's accuracy for the gate, the
    collapse flags) over workers so every worker takes the same decisions and stops at the same step,
    and `state_dict` / `load_state_dict` checkpoint and resume the whole loop. `adapt()` is this class
    run start to finish in one process.
    """

    def __init__(
        self,
        source: GeneratorCheckpoint,
        source_images: list[LoadedImage],
        target_images: list[LoadedImage],
        config: AdaptConfig,
        *,
        device: torch.device | None = None,
        prepare: Prepare | None = None,
        sampler_factory: SamplerFactory | None = None,
        sync_batchnorm: bool = False,
        reduce: Reduce | None = None,
    ):
        seed_everything(config.seed)
        self.reduce = reduce
        self.distributed = reduce is not None
        self.config = config
        self.device = device or resolve_device(config.device)
        for layer in config.layer:
            source.generator.check_layer(layer)
        if config.crop_size % source.config.multiple:
            raise LmaddaError(f"crop_size {config.crop_size} must be a multiple of {source.config.multiple} (2**depth)")
        prepare = prepare or (lambda module: module)

        self.source_generator = copy.deepcopy(source.generator).eval().to(self.device)
        for parameter in self.source_generator.parameters():
            parameter.requires_grad_(False)
        self.target_generator, trainable = _prepare_target_generator(self.source_generator, config)
        if sync_batchnorm and config.bn_mode == "train":
            for index in range(config.cut + 1):  # trained BatchNorm sees every worker's batch
                self.target_generator.layers[index] = nn.SyncBatchNorm.convert_sync_batchnorm(self.target_generator.layers[index])
        self.target_features = prepare(MatchedFeatures(self.target_generator, config))

        crops = max(64, config.batch_size)
        self.sampler_factory = sampler_factory
        self.source_crops = UnpairedCrops(source_images, config.crop_size, length=crops, seed=config.seed)
        self.source_batches = endless(self.source_crops, config.batch_size, config.seed, sampler_factory)
        self.input_correction = HistogramMatcher(source_images) if config.input_correction == "histogram_matching" else None
        if self.input_correction is not None:  # G' learns on corrected inputs, as it will see them in use
            target_images = [dataclasses.replace(image, input=self.input_correction(image.input)) for image in target_images]
        self.target_images = target_images  # (corrected) for the adapted model's domain reference at the end
        self.target_crops = UnpairedCrops(target_images, config.crop_size, length=crops, seed=config.seed + 1)
        self.target_batches = endless(self.target_crops, config.batch_size, config.seed + 1, sampler_factory)

        with torch.no_grad():  # size each discriminator to the tensor it judges
            probe = matched_features(self.source_generator, next(self.source_batches).to(self.device), config)
        discriminators = FeatureDiscriminators({
            name: FeatureDiscriminator(t.shape[1], min(t.shape[2:]), width=config.d_width, use_spectral_norm=config.spectral_norm)
            for name, t in probe.items()
        })
        init_weights(discriminators)
        self.discriminators = prepare(discriminators.to(self.device))
        self.weights = feature_weights(config, list(probe))

        betas = (config.beta1, 0.999)
        self.optimizer_g = torch.optim.Adam(trainable, lr=config.lr, betas=betas)
        self.optimizer_d = torch.optim.Adam(self.discriminators.parameters(), lr=config.d_lr or config.lr, betas=betas)
        self.step_number = 0
        self.running_accuracy = 0.5
        self.saturated_logs = 0
        self.result = AdaptResult(generator=self.target_generator, input_correction=self.input_correction)
        self._sums = {"g_loss": 0.0, "d_loss": 0.0, "d_acc": 0.0, "g_updates": 0.0}

    def step(self) -> dict | None:
        """One LM-ADDA update (D, then G'); returns a log record every `log_every` steps."""
        with autocast_for(self.config.precision, self.device):
            return self._step()

    def _step(self) -> dict | None:
        """The two players of ADDA (Tzeng et al. 2017, eq. 9), matched at the cut: D learns to tell source features
        from adapted target features, then G' (layers 0..l) learns to fool it. Everything else is bookkeeping."""
        config, device = self.config, self.device
        self.step_number += 1
        x_source = next(self.source_batches).to(device)
        x_target = next(self.target_batches).to(device)
        anchored = config.source_anchor > 0
        with torch.no_grad():
            source_state = cut_state(self.source_generator, x_source, config)
            source_features = features_of(source_state, config)
        target_features, anchor_tensors = self.target_features(x_target, x_source if anchored else None)

        if config.adversary == "moments":  # no D: G' closes the gap in the features' first and second moments
            loss_g = moment_loss(source_features, target_features, self.weights)
            self.optimizer_g.zero_grad(set_to_none=True)
            accuracy, d_value = 1.0, 0.0  # accuracy 1: nothing holds G' back
        else:
            # 1. D: source features are real, adapted target features are fake.
            self.optimizer_d.zero_grad(set_to_none=True)
            loss_d, accuracy = discriminator_loss(self.discriminators, source_features, target_features, self.weights,
                                                  real_label=1.0 - config.label_smoothing)
            loss_d.backward()
            self.optimizer_d.step()
            # 2. G': inverted labels, so G' learns to make target features look like source.
            self.optimizer_g.zero_grad(set_to_none=True)
            loss_g = generator_loss(self.discriminators, target_features, self.weights)
            d_value = loss_d.item()
        g_value = loss_g.item()
        if anchored:  # G' must still do to source images what G does: fooling D by erasing content costs here
            loss_g = loss_g + config.source_anchor * anchor_loss(anchor_tensors, source_state.tensors())

        if self._update_generator(accuracy, g_value, d_value):
            loss_g.backward()
            self.optimizer_g.step()
            self.result.g_updates += 1
        elif self.distributed:  # DDP expects a backward after each forward on every worker
            loss_g.backward()
        return self._log()

    def _update_generator(self, accuracy: float, g_value: float, d_value: float) -> bool:
        """Agree the step's numbers across workers, mark a collapse, and decide whether G' updates: after D's warm-up,
        once D's running accuracy reaches the gate (a D that cannot tell the domains apart gives G' no signal)."""
        config, result = self.config, self.result
        moments = config.adversary == "moments"  # no D to warm up, gate on, or saturate
        non_finite = float(not (math.isfinite(g_value) and math.isfinite(d_value)))
        # the bound is on D's BCE; a moment gap has no such scale (its collapse shows as a non-finite loss)
        over_bound = float(g_value > config.collapse_g_loss and not moments)
        if self.reduce is not None:  # every worker decides (and logs) on the same numbers
            accuracy, non_finite, over_bound, g_value, d_value = self.reduce([accuracy, non_finite, over_bound, g_value, d_value])
        self.running_accuracy = 0.9 * self.running_accuracy + 0.1 * accuracy
        update = moments or (self.step_number > config.d_warmup_steps
                             and (config.gate_accuracy is None or self.running_accuracy >= config.gate_accuracy))
        for key, value in (("g_loss", g_value), ("d_loss", d_value), ("d_acc", accuracy), ("g_updates", float(update))):
            self._sums[key] += value
        result.steps_done = self.step_number
        if non_finite > 0:
            result.collapsed, result.collapse_reason = True, f"non-finite loss at step {self.step_number}"
        elif over_bound > 0:
            result.collapsed, result.collapse_reason = True, (f"generator loss {g_value:.3g} > bound {config.collapse_g_loss} "
                                                              f"at step {self.step_number}")
        return update

    def _log(self) -> dict | None:
        """A log record every `log_every` steps (and at the last step or a collapse): the means since the last one.
        D's saturation is judged here, on those means."""
        config, result, step = self.config, self.result, self.step_number
        if not (step % config.log_every == 0 or step == config.steps or result.collapsed):
            return None
        count = (step - 1) % config.log_every + 1
        record = {"step": step, **{k: v / count for k, v in self._sums.items()}, "d_running_acc": self.running_accuracy,
                  "g_updates_total": result.g_updates}
        moments = config.adversary == "moments"
        self.saturated_logs = self.saturated_logs + 1 if record["d_acc"] >= config.saturation_accuracy and not moments else 0
        result.d_saturated = result.d_saturated or self.saturated_logs >= config.saturation_patience
        if result.d_saturated and config.saturation_collapses and not result.collapsed:
            result.collapsed = True
            result.collapse_reason = f"discriminator saturated for {config.saturation_patience} logs in a row (step {step})"
        # Collapse is decided here and only here: the sweep's stopper and its results table read these fields.
        record.update({"collapsed": result.collapsed, "collapse_reason": result.collapse_reason, "d_saturated": result.d_saturated})
        result.history.append(record)
        self._sums = dict.fromkeys(self._sums, 0.0)
        return record

    @property
    def finished(self) -> bool:
        return self.step_number >= self.config.steps or (self.result.collapsed and self.config.stop_on_collapse)

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: weights of G' and D, optimiser states, counters, history, the sums
        of the log in progress (plain data and tensors: `lmadda.checkpoint.save_loop_state` stores it as it is)."""
        discriminators = self.discriminators.module if hasattr(self.discriminators, "module") else self.discriminators
        return {
            "step": self.step_number, "running_accuracy": self.running_accuracy, "saturated_logs": self.saturated_logs,
            "target_generator": self.target_generator.state_dict(), "discriminators": discriminators.state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(), "optimizer_d": self.optimizer_d.state_dict(),
            "history": list(self.result.history), "collapsed": self.result.collapsed,
            "collapse_reason": self.result.collapse_reason, "d_saturated": self.result.d_saturated,
            "g_updates": self.result.g_updates, "partial_sums": dict(self._sums),
        }

    def load_state_dict(self, state: dict) -> None:
        discriminators = self.discriminators.module if hasattr(self.discriminators, "module") else self.discriminators
        self.target_generator.load_state_dict(state["target_generator"])
        discriminators.load_state_dict(state["discriminators"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.step_number = state["step"]
        self.running_accuracy = state["running_accuracy"]
        self.saturated_logs = state["saturated_logs"]
        self.result.history = list(state["history"])
        self.result.steps_done = self.step_number
        self.result.collapsed, self.result.collapse_reason = state["collapsed"], state["collapse_reason"]
        self.result.d_saturated = state["d_saturated"]
        self.result.g_updates = state["g_updates"]
        self._sums = dict(state["partial_sums"])
        # The crop streams go on where they stopped (the probe in __init__ drew one source batch before step 1),
        # so the resumed loop takes exactly the steps an uninterrupted one would.
        config = self.config
        self.source_batches = endless(self.source_crops, config.batch_size, config.seed, self.sampler_factory, skip=1 + self.step_number)
        self.target_batches = endless(self.target_crops, config.batch_size, config.seed + 1, self.sampler_factory, skip=self.step_number)

    def finish(self) -> AdaptResult:
        return finish_result(self.result, self.target_generator, self.target_images)


def finish_result(result: AdaptResult, trained: UNetGenerator, target_images: list[LoadedImage]) -> AdaptResult:
    """`result` with a frozen CPU copy of the `trained` generator and that model's domain reference: the target's,
    every fourth target image held out for its thresholds (every family's loop ends here)."""
    generator = copy.deepcopy(trained).cpu().eval()
    for parameter in generator.parameters():
        parameter.requires_grad_(False)
    result.generator = generator
    held_out = target_images[::4] if len(target_images) >= 4 else None
    rest = [image for index, image in enumerate(target_images) if held_out is None or index % 4]
    try:
        result.domain_reference = reference_from_images(generator, rest, held_out, domain="target")
    except LmaddaError:  # a diverged run (flagged collapsed): saved as it is, but its features describe no domain
        result.domain_reference = None
    return result


def adapt(
    source: GeneratorCheckpoint,
    source_images: list[LoadedImage],
    target_images: list[LoadedImage],
    config: AdaptConfig,
    *,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
) -> AdaptResult:
    """Adapt `source` to the domain of `target_images` (input only) by LM-ADDA at `config.layer`."""
    adapter = Adapter(source, source_images, target_images, config)
    bar = Progress(config.steps, f"adapt layer {config.layer}", progress)
    start = time.perf_counter()

    def logged(record: dict) -> None:
        if on_log:
            on_log(record)
        bar.update(record["step"], g=record["g_loss"], d=record["d_loss"], acc=record["d_acc"])

    logged(run_steps(adapter, logged))
    result = adapter.finish()
    result.seconds = time.perf_counter() - start
    return result


def run_steps(adapter: Adapter, on_record: Callable[[dict], None] | None = None, *, end_on_collapse: bool = False,
              steps_s: float = 0.0) -> dict:
    """Step `adapter` to its end and return its last log record, which `on_record` does not see: a caller
    reports it with what it then measures of the finished model (the study's and the sweep's trials).

    The end is the Adapter's (its last step, or its collapse under `stop_on_collapse`), or, with
    `end_on_collapse`, the first record flagged collapsed whatever `stop_on_collapse` says (a grid point
    ends there). Every record carries `steps_s`: seconds spent inside steps, counted on from `steps_s`
    (what a resumed run had spent before).
    """
    while True:
        started = time.perf_counter()
        record = adapter.step()
        steps_s += time.perf_counter() - started
        if record is None:
            continue
        record = {**record, "steps_s": steps_s}
        if adapter.finished or (end_on_collapse and record["collapsed"]):
            return record
        if on_record is not None:
            on_record(record)
