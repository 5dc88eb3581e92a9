"""bf16 autocast (`precision: bf16`) trains and adapts with finite losses and fp32 weights."""

import math

import torch

from lmadda.checkpoint import load_checkpoint
from lmadda.data.dataset import load_images
from lmadda.data.manifest import Manifest
from lmadda.training.adapt import AdaptConfig, adapt
from lmadda.training.source import SourceTrainConfig, train_source


def test_bf16_source_training_and_adaptation_give_finite_losses_and_fp32_weights(tiny_synth, tiny_source):
    config = SourceTrainConfig(manifest=tiny_synth.source, markers=["dapi"], ngf=4, depth=6, ndf=4, crop_size=64, batch_size=2,
                               epochs=1, crops_per_epoch=4, device="cpu", precision="bf16")
    trained = train_source(config, progress=False)
    assert all(math.isfinite(v) for v in trained.history[0].values())
    assert all(p.dtype == torch.float32 for p in trained.checkpoint.generator.parameters())

    source = load_checkpoint(tiny_source)
    manifest = Manifest.load(tiny_synth.source)
    images = load_images(manifest, "phase_contrast", "train", percentiles=source.percentiles)
    targets = load_images(manifest, "bright_field", "train", percentiles=source.percentiles)
    result = adapt(source, images, targets, AdaptConfig(layer=3, steps=4, batch_size=2, crop_size=64, log_every=2, device="cpu",
                                                        gate_accuracy=None, d_warmup_steps=0, precision="bf16"), progress=False)
    assert not result.collapsed and all(math.isfinite(r["g_loss"]) and math.isfinite(r["d_loss"]) for r in result.history)
    assert all(p.dtype == torch.float32 for p in result.generator.parameters())
