"""Source training: pix2pix (L1 + conditional PatchGAN) on paired images of one setting.

The step follows the reference's `optimize_parameters`: update D on (input, target) vs
(input, G(input)) with its loss halved, then update G with the GAN loss plus lambda * L1.
Validation Pearson is computed after every epoch and the best generator is kept.

`SourceHooks` lets Ray Train run the same loop data-parallel (`lmadda_tune.train_workers.source_worker`):
`prepare` wraps G and D (DDP), `sampler_factory` shards the crops, `world_size` splits the batch so
the effective batch stays `batch_size`, and `resume` / `on_epoch` checkpoint and resume by epoch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint, save_checkpoint
from lmadda.core.device import resolve_device
from lmadda.core.errors import LmaddaError
from lmadda.core.progress import Progress
from lmadda.data.augment import NuisanceAugmentation
from lmadda.data.dataset import LoadedImage, PairedCrops, load_images
from lmadda.data.manifest import Manifest
from lmadda.data.normalise import PercentileRange, median_params
from lmadda.data.shifts import Shift
from lmadda.domain import reference_from_images
from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.models.discriminators import PatchDiscriminator
from lmadda.models.generator import GeneratorConfig, UNetGenerator, init_weights
from lmadda.core.registry_names import target_name
from lmadda.training.common import autocast_for, endless, seed_everything


class SourceTrainConfig(BaseModel):
    """Options of `lmadda train-source`. Defaults are CPU-sized; the paper used ngf=64 on 1024x1024."""

    model_config = ConfigDict(extra="forbid")

    manifest: Path = Field(description="data manifest (.parquet)")
    setting: str = Field("phase_contrast", description="input setting to learn from")
    markers: list[str] = Field(default_factory=lambda: ["dapi"], min_length=1, description="target markers, one output channel each")
    shift: str | None = Field(None, description="train on shifted inputs (e.g. an oracle for overexposure:1.5)")
    ngf: int = Field(16, ge=1)
    depth: int = Field(8, ge=2, le=10)
    ndf: int = Field(16, ge=1, description="PatchGAN width (64 in pix2pix; 16 keeps CPU training fast)")
    crop_size: int = Field(256, ge=4)
    batch_size: int = Field(4, ge=1)
    epochs: int = Field(10, ge=1)
    crops_per_epoch: int = Field(160, ge=1)
    lr: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    lambda_l1: float = Field(100.0, ge=0)
    gan_loss: Literal["vanilla", "none"] = Field("vanilla", description="'none' trains with L1 only")
    percentiles: tuple[float, float] = (1.0, 99.8)
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast: 1.4-1.8x faster on CPU here (docs/performance.md)")
    augment: NuisanceAugmentation | None = Field(None, description="train on augmented copies of each field beside the clean one "
                                                                     "(imaging nuisances, lmadda.data.augment): a robust source model")
    init_from: Path | None = Field(None, description="start from this checkpoint's generator weights (fine-tuning, e.g. the study's "
                                                     "oracle on target pairs); its architecture must match ngf/depth")

    @field_validator("shift")
    @classmethod
    def _shift_parses(cls, value: str | None) -> str | None:
        if value:
            Shift.parse(value)
        return value

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig(in_channels=1, out_channels=len(self.markers), ngf=self.ngf, depth=self.depth)


@dataclass
class SourceHooks:
    """How a distributed runner plugs into `train_source` (all optional; the defaults run one process)."""

    prepare: Callable[[nn.Module], nn.Module] | None = None  # e.g. ray.train.torch.prepare_model (DDP)
    sampler_factory: Callable[[object, int], object] | None = None  # e.g. a DistributedSampler per epoch
    world_size: int = 1  # batch_size is the effective batch: each of world_size workers takes its share
    sync_batchnorm: bool = False  # BatchNorm statistics over every worker's share of the batch
    device: torch.device | None = None


@dataclass
class SourceTrainResult:
    checkpoint: GeneratorCheckpoint
    history: list[dict] = field(default_factory=list)
    best_val_pearson: float = float("nan")
    seconds: float = 0.0


def pix2pix_step(
    generator: nn.Module, discriminator: nn.Module, optimizer_g: torch.optim.Optimizer, optimizer_d: torch.optim.Optimizer,
    real_input: torch.Tensor, real_target: torch.Tensor, lambda_l1: float, use_gan: bool = True,
) -> dict[str, float]:
    """One pix2pix update: D on real pairs vs fake pairs (loss halved), then G on GAN + lambda * L1."""
    bce = nn.functional.binary_cross_entropy_with_logits
    fake_target = generator(real_input)

    losses: dict[str, float] = {}
    if use_gan:
        # Fake and real pairs pass D separately (its BatchNorm sees each batch alone, as in the
        # reference), each followed by its own backward: a DDP-wrapped module allows one forward per
        # backward, and the gradients add up to those of the summed loss.
        optimizer_d.zero_grad(set_to_none=True)
        pred_fake = discriminator(torch.cat([real_input, fake_target.detach()], 1))
        loss_d_fake = 0.5 * bce(pred_fake, torch.zeros_like(pred_fake))
        loss_d_fake.backward()
        pred_real = discriminator(torch.cat([real_input, real_target], 1))
        loss_d_real = 0.5 * bce(pred_real, torch.ones_like(pred_real))
        loss_d_real.backward()
        optimizer_d.step()
        losses["d_loss"] = loss_d_fake.item() + loss_d_real.item()

    optimizer_g.zero_grad(set_to_none=True)
    loss_l1 = nn.functional.l1_loss(fake_target, real_target)
    loss_g = lambda_l1 * loss_l1
    if use_gan:
        pred_fake = discriminator(torch.cat([real_input, fake_target], 1))
        loss_g_gan = bce(pred_fake, torch.ones_like(pred_fake))
        loss_g = loss_g + loss_g_gan
        losses["g_gan"] = loss_g_gan.item()
    loss_g.backward()
    optimizer_g.step()
    losses["g_l1"] = loss_l1.item()
    return losses


def build_source_models(config: SourceTrainConfig) -> tuple[UNetGenerator, PatchDiscriminator]:
    generator = UNetGenerator(config.generator_config())
    discriminator = PatchDiscriminator(in_channels=1 + len(config.markers), ndf=config.ndf)
    init_weights(generator)
    init_weights(discriminator)
    return generator, discriminator


def load_source_data(config: SourceTrainConfig) -> tuple[Manifest, list[LoadedImage], list[LoadedImage]]:
    manifest = Manifest.load(config.manifest)
    percentiles = PercentileRange(*config.percentiles)
    shift = Shift.parse(config.shift) if config.shift else None
    train = load_images(manifest, config.setting, "train", config.markers, shift=shift, percentiles=percentiles, seed=config.seed,
                        augment=config.augment)
    val = load_images(manifest, config.setting, "val", config.markers, shift=shift, percentiles=percentiles, seed=config.seed + 1,
                      augment=config.augment.for_validation() if config.augment else None)
    return manifest, train, val


def _load_initial_weights(generator: nn.Module, config: SourceTrainConfig) -> None:
    from lmadda.checkpoint import load_checkpoint

    initial = load_checkpoint(config.init_from)
    if initial.config != generator.config:
        raise LmaddaError(f"init_from {config.init_from}: its generator ({initial.describe()}) differs from this config's "
                          f"(ngf {config.ngf}, depth {config.depth}, markers {config.markers}); set ngf/depth/markers to match it")
    generator.load_state_dict(initial.generator.state_dict())


def train_source(
    config: SourceTrainConfig,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    on_epoch: Callable[[dict, dict], None] | None = None,
    data: tuple[list[LoadedImage], list[LoadedImage]] | None = None,
    hooks: SourceHooks = SourceHooks(),
    resume: dict | None = None,
) -> SourceTrainResult:
    """Train a source generator; keep the generator with the best validation Pearson; save it to `out`.

    `on_epoch(record, state)` is called after every epoch with the epoch's record and the loop's
    state (what `resume` takes to continue after that epoch).
    """
    seed_everything(config.seed)
    device = hooks.device or resolve_device(config.device)
    if data is None:
        _, train_images, val_images = load_source_data(config)
    else:
        train_images, val_images = data
    if config.crop_size % (2**config.depth):
        raise LmaddaError(f"crop_size {config.crop_size} must be a multiple of 2**depth = {2**config.depth}")
    if config.batch_size % hooks.world_size:
        raise LmaddaError(f"batch_size {config.batch_size} must be a multiple of the number of workers ({hooks.world_size}): "
                          "it is the effective batch, split evenly over the workers")
    worker_batch = config.batch_size // hooks.world_size

    generator, discriminator = build_source_models(config)
    if config.init_from is not None and resume is None:
        _load_initial_weights(generator, config)
    if hooks.sync_batchnorm:
        generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    generator.to(device)
    discriminator.to(device)
    betas = (config.beta1, 0.999)
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=betas)
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=betas)
    history: list[dict] = []
    best_pearson, best_state, first_epoch = -np.inf, None, 0
    if resume is not None:
        generator.load_state_dict(resume["generator"])
        discriminator.load_state_dict(resume["discriminator"])
        optimizer_g.load_state_dict(resume["optimizer_g"])
        optimizer_d.load_state_dict(resume["optimizer_d"])
        history, best_pearson, best_state = list(resume["history"]), resume["best_pearson"], resume["best_generator"]
        first_epoch = resume["epoch"]
    prepare = hooks.prepare or (lambda module: module)
    trained_generator, trained_discriminator = prepare(generator), prepare(discriminator)

    crops = PairedCrops(train_images, crop_size=config.crop_size, length=config.crops_per_epoch, seed=config.seed)
    batches = endless(crops, worker_batch, config.seed, hooks.sampler_factory, first_epoch=first_epoch)
    steps_per_epoch = max(1, config.crops_per_epoch // config.batch_size)

    start = time.perf_counter()
    bar = Progress(config.epochs * steps_per_epoch, f"train-source {config.setting}->{','.join(config.markers)}", progress)
    for epoch in range(first_epoch, config.epochs):
        trained_generator.train()
        trained_discriminator.train()
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            real_input, real_target = (t.to(device) for t in next(batches))
            with autocast_for(config.precision, device):
                losses = pix2pix_step(trained_generator, trained_discriminator, optimizer_g, optimizer_d, real_input, real_target,
                                      config.lambda_l1, use_gan=config.gan_loss == "vanilla")
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.update(epoch * steps_per_epoch + step + 1, **{k: v / (step + 1) for k, v in sums.items()})
        rows = evaluate_generator(generator, val_images, config.markers, device=device)
        val_pearson = float(np.nanmean([r["pearson"] for r in rows]))
        record = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}, "val_pearson": val_pearson}
        for marker in config.markers:
            record[f"val_pearson_{marker}"] = float(np.nanmean([r["pearson"] for r in rows if r["marker"] == marker]))
        history.append(record)
        if val_pearson > best_pearson:
            best_pearson, best_state = val_pearson, copy.deepcopy(generator.state_dict())
        if on_epoch:
            on_epoch(record, {
                "epoch": epoch + 1, "generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                "optimizer_g": optimizer_g.state_dict(), "optimizer_d": optimizer_d.state_dict(),
                "history": list(history), "best_pearson": best_pearson, "best_generator": best_state,
            })

    checkpoint = source_checkpoint(config, best_state, train_images, history, best_pearson, held_out_images=val_images)
    if out is not None:
        save_checkpoint(out, checkpoint)
    return SourceTrainResult(checkpoint=checkpoint, history=history, best_val_pearson=best_pearson, seconds=time.perf_counter() - start)


def training_pixel_size(config: SourceTrainConfig) -> float | None:
    """The pixel size (µm) the model learns at: its setting's, from the manifest or else its files, as the training
    shift leaves it (`scale:z` makes pixels z times smaller); None when nothing records it."""
    from lmadda.data.manifest import images_pixel_size

    if not Path(config.manifest).is_file():
        return None  # callers that hand the images in (`data=`) may name no manifest that exists
    return images_pixel_size(Manifest.load(config.manifest), config.setting, Shift.parse(config.shift) if config.shift else None)


# Where a reused model's options may differ from the config's: the paths move with the study's folder, and the
# device it was trained on says nothing of how.
_MOVABLE_OPTIONS = ("manifest", "init_from", "device")


def changed_options(path: Path, config: SourceTrainConfig) -> list[str]:
    """The training options of the model saved at `path` that differ from `config`'s, as `name: saved -> config`
    (one level into nested options such as `augment`). An option the saved model does not record reads `absent`: it
    predates the option, which matches only an option that is off (None)."""
    saved = load_checkpoint(path).metadata.get("train_config", {})
    wanted = config.model_dump(mode="json")

    def flat(options: dict) -> dict:
        out = {}
        for key, value in options.items():
            if key in _MOVABLE_OPTIONS:
                continue
            out.update({f"{key}.{inner}": v for inner, v in value.items()} if isinstance(value, dict) else {key: value})
        return out

    saved, wanted = flat(saved), flat(wanted)
    return [f"{key}: {saved.get(key, 'absent')} -> {wanted.get(key, 'absent')}"
            for key in sorted(saved.keys() | wanted.keys()) if saved.get(key) != wanted.get(key)]


def source_checkpoint(config: SourceTrainConfig, generator_state: dict, train_images: list[LoadedImage],
                      history: list[dict], best_pearson: float, held_out_images: list[LoadedImage] | None = None) -> GeneratorCheckpoint:
    """The checkpoint of a source model: the generator with `generator_state`, how it was trained, and its domain
    reference (training images; thresholds from `held_out_images`, the validation fields)."""
    generator = UNetGenerator(config.generator_config())
    # SyncBatchNorm and BatchNorm2d share parameter and buffer names, so a distributed state loads here.
    generator.load_state_dict(generator_state)
    generator.eval()
    setting = target_name(config.setting, config.shift)
    return GeneratorCheckpoint(
        generator=generator,
        markers=list(config.markers),
        setting=setting,
        percentiles=PercentileRange(*config.percentiles),
        target_norm=median_params([image.target_norm for image in train_images]),
        metadata={
            "method": "source",
            "train_config": config.model_dump(mode="json"),
            "best_val_pearson": best_pearson,
            "history": history,
            "pixel_size_um": training_pixel_size(config),
        },
        domain_reference=reference_from_images(generator, train_images, held_out_images, domain=setting),
    )
