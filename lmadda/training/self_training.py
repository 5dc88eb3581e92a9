"""Self-training adaptation, layer-limited: a mean teacher's confident stains teach G' on target images.

    G'  the student: a copy of G; only layers 0..l train (the paper's cut, carried over), the rest
        stay frozen with their source BatchNorm statistics
    T   the teacher: an exponential moving average of G' (Tarvainen & Valpola 2017), starting at G

Each step, on a batch of unlabelled target crops x':

1. T stains x' under the four mirror symmetries, each mirrored back; their mean is the pseudo-label
   and their spread its uncertainty. Only each crop's `confident_fraction` of pixels with the lowest
   spread count (Liu et al., MICCAI 2021: uncertainty-masked pseudo-labels).
2. G' stains a strongly perturbed view of the same crops (gamma, noise, blur: photometric only, so the
   pseudo-label still lines up pixel for pixel) and learns the masked L1 to the pseudo-label.
3. An L2-SP term (Li et al., ICML 2018) pulls the trained weights toward the source's: G' may only
   move as far as the target's evidence pushes it.
4. T follows G' by EMA; T is the adapted model.

Stopping is label-free: every `log_every` steps the masked teacher-student disagreement on a fixed
probe of target crops is measured, and the loop ends when it has not improved by `min_delta`
(relative) for `patience` logs in a row, or at `steps`.

`input_correction: histogram_matching` is the composite: both players see corrected inputs, and the
model carries the correction, as an LM-ADDA model does.

The loop has the Adapter's stepping interface (`step`, `finished`, `finish`), so the study's trial
function and `adapt --layer auto` run it as they run LM-ADDA.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.core.device import resolve_device
from lmadda.core.errors import LmaddaError
from lmadda.data.correction import HistogramMatcher
from lmadda.data.dataset import LoadedImage, UnpairedCrops
from lmadda.models.generator import UNetGenerator
from lmadda.training.adapt import AdaptResult, finish_result
from lmadda.training.common import autocast_for, endless, seed_everything


class SelfTrainConfig(BaseModel):
    """Options of self-training adaptation (the `self_training` family)."""

    model_config = ConfigDict(extra="forbid")

    layer: list[int] = Field(description="layers 0..l train (one layer l); the last layer trains the whole generator")
    steps: int = Field(80, ge=1, description="the most steps; the label-free stop may end it sooner")
    batch_size: int = Field(2, ge=1)
    crop_size: int = Field(256, ge=4)
    lr: float = Field(1e-4, gt=0, description="learning rate of the student G'")
    ema: float = Field(0.9, ge=0, lt=1, description="teacher = ema * teacher + (1 - ema) * student, every step")
    l2_sp: float = Field(0.01, ge=0, description="weight of the L2-SP pull toward the source weights (sum of squares)")
    confident_fraction: float = Field(0.8, gt=0, le=1, description="pixels of each crop that count: those where the "
                                                                    "teacher's mirror views agree best")
    strong_gamma: float = Field(1.4, ge=1, description="the student's view: gamma drawn log-uniformly in [1/g, g]")
    strong_noise: float = Field(0.03, ge=0, description="the student's view: Gaussian noise up to this std (model units)")
    strong_blur: float = Field(1.0, ge=0, description="the student's view: Gaussian blur up to this sigma (pixels)")
    input_correction: Literal["histogram_matching"] | None = Field(None, description="correct target inputs first (the composite)")
    patience: int = Field(3, ge=1, description="logs without improvement of the probe's disagreement before the stop")
    min_delta: float = Field(0.01, ge=0, description="relative improvement that counts")
    probe_crops: int = Field(4, ge=1, description="fixed target crops the label-free stop measures")
    log_every: int = Field(10, ge=1)
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"

    @field_validator("layer", mode="before")
    @classmethod
    def _one_layer(cls, value):
        value = [value] if isinstance(value, int) else value
        if not isinstance(value, list) or len(value) != 1:
            raise ValueError(f"self-training trains layers 0..l for one layer l, got {value}")
        return value

    @property
    def cut(self) -> int:
        return self.layer[0]


def trainable_head(source: UNetGenerator, cut: int) -> tuple[UNetGenerator, list[nn.Parameter]]:
    """A copy of `source` in eval mode whose layers 0..cut train and whose later layers are frozen."""
    student = copy.deepcopy(source).eval()
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    trainable = student.layer_parameters(cut)
    for parameter in trainable:
        parameter.requires_grad_(True)
    return student, trainable


MIRRORS = ((), (-1,), (-2,), (-2, -1))  # the four mirror symmetries, each its own inverse


@torch.no_grad()
def pseudo_label(teacher: UNetGenerator, x: torch.Tensor, confident_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's mean stain over the mirror views of `x`, and a mask of each crop's most confident pixels."""
    views = torch.stack([torch.flip(teacher(torch.flip(x, dims)), dims) if dims else teacher(x) for dims in MIRRORS])
    mean, spread = views.mean(dim=0), views.std(dim=0).mean(dim=1, keepdim=True)  # spread over views, averaged over markers
    flat = spread.flatten(1)
    threshold = torch.quantile(flat, confident_fraction, dim=1).view(-1, 1, 1, 1)
    return mean, (spread <= threshold).to(mean.dtype)


def strong_view(x: torch.Tensor, config: SelfTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """A photometric perturbation of model-range inputs (-1..1): gamma, then blur, then noise, drawn per crop."""
    batch = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator, device="cpu").to(x.device)  # noqa: E731
    log_gamma = (rand(batch, 1, 1, 1) * 2 - 1) * math.log(config.strong_gamma)
    view = ((x + 1) / 2).clamp(min=0) ** torch.exp(log_gamma) * 2 - 1
    if config.strong_blur > 0:
        sigma = float(rand(1)) * config.strong_blur
        if sigma > 0.3:
            radius = max(1, int(math.ceil(2 * sigma)))
            offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
            kernel = torch.exp(-offsets**2 / (2 * sigma**2))
            kernel = kernel / kernel.sum()
            channels = view.shape[1]
            view = nn.functional.pad(view, (radius, radius, radius, radius), mode="reflect")
            view = nn.functional.conv2d(view, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
            view = nn.functional.conv2d(view, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    noise = rand(batch, 1, 1, 1) * config.strong_noise
    return view + noise * torch.randn(view.shape, generator=generator, device="cpu").to(x.device)


def masked_l1(prediction: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((prediction - label).abs() * mask).sum() / (mask.sum() * prediction.shape[1]).clamp(min=1.0)


class SelfTrainer:
    """The self-training loop, step by step, with the Adapter's interface (`step`, `finished`, `finish`)."""

    def __init__(self, source: GeneratorCheckpoint, source_images: list[LoadedImage], target_images: list[LoadedImage],
                 config: SelfTrainConfig, *, device: torch.device | None = None):
        seed_everything(config.seed)
        self.config = config
        self.device = device or resolve_device(config.device)
        source.generator.check_layer(config.cut)
        if config.crop_size % source.config.multiple:
            raise LmaddaError(f"crop_size {config.crop_size} must be a multiple of {source.config.multiple} (2**depth)")
        self.input_correction = HistogramMatcher(source_images) if config.input_correction == "histogram_matching" else None
        if self.input_correction is not None:
            target_images = [dataclasses.replace(image, input=self.input_correction(image.input)) for image in target_images]
        self.target_images = target_images
        self.student, trainable = trainable_head(source.generator, config.cut)
        self.student.to(self.device)
        self.teacher = copy.deepcopy(self.student)
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.trainable = trainable
        self.anchor = [parameter.detach().clone() for parameter in trainable]  # the source weights L2-SP pulls toward
        self.optimizer = torch.optim.Adam(trainable, lr=config.lr, betas=(0.9, 0.999))
        crops = UnpairedCrops(target_images, config.crop_size, length=max(64, config.batch_size), seed=config.seed + 1)
        self.batches = endless(crops, config.batch_size, config.seed + 1)
        probe = UnpairedCrops(target_images, config.crop_size, length=config.probe_crops, seed=config.seed + 1000, flips=False)
        self.probe = torch.stack([probe[i] for i in range(len(probe))]).to(self.device)
        self.noise = torch.Generator().manual_seed(config.seed + 2)
        self.step_number = 0
        self.best_probe, self.stale_logs, self.stopped = math.inf, 0, False
        self.result = AdaptResult(generator=self.teacher, input_correction=self.input_correction, method="self_training")
        self._sums = {"g_loss": 0.0, "d_loss": 0.0}

    def drift(self) -> torch.Tensor:
        """Squared distance of the trained weights from the source's (what L2-SP penalises)."""
        return sum(((parameter - anchor) ** 2).sum() for parameter, anchor in zip(self.trainable, self.anchor))

    def step(self) -> dict | None:
        with autocast_for(self.config.precision, self.device):
            return self._step()

    def _step(self) -> dict | None:
        config = self.config
        self.step_number += 1
        x = next(self.batches).to(self.device)
        label, mask = pseudo_label(self.teacher, x, config.confident_fraction)
        consistency = masked_l1(self.student(strong_view(x, config, self.noise)), label, mask)
        drift = self.drift()
        loss = consistency + config.l2_sp * drift
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():  # the teacher follows the student
            for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
                if student.requires_grad:
                    teacher.mul_(config.ema).add_(student.detach(), alpha=1 - config.ema)
        self.result.g_updates += 1
        self.result.steps_done = self.step_number
        self._sums["g_loss"] += consistency.item()
        self._sums["d_loss"] += drift.item()
        if not math.isfinite(loss.item()):
            self.result.collapsed, self.result.collapse_reason = True, f"non-finite loss at step {self.step_number}"
        if not (self.step_number % config.log_every == 0 or self.step_number == config.steps or self.result.collapsed):
            return None
        probe = self._probe_disagreement()
        if probe < self.best_probe * (1 - config.min_delta):
            self.best_probe, self.stale_logs = probe, 0
        else:
            self.stale_logs += 1
        self.stopped = self.stale_logs >= config.patience
        count = (self.step_number - 1) % config.log_every + 1
        record = {"step": self.step_number, "g_loss": self._sums["g_loss"] / count, "d_loss": self._sums["d_loss"] / count,
                  "d_acc": float("nan"), "probe_disagreement": probe, "g_updates_total": self.result.g_updates,
                  "collapsed": self.result.collapsed, "collapse_reason": self.result.collapse_reason, "d_saturated": False}
        self.result.history.append(record)
        self._sums = dict.fromkeys(self._sums, 0.0)
        return record

    @torch.no_grad()
    def _probe_disagreement(self) -> float:
        """Masked teacher-vs-student disagreement on the fixed probe crops, unperturbed: label-free progress."""
        label, mask = pseudo_label(self.teacher, self.probe, self.config.confident_fraction)
        return float(masked_l1(self.student(self.probe), label, mask))

    @property
    def finished(self) -> bool:
        return self.step_number >= self.config.steps or self.stopped or self.result.collapsed

    def finish(self) -> AdaptResult:
        return finish_result(self.result, self.teacher, self.target_images)  # the teacher is the adapted model
