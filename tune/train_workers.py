"""Ray Train per-worker functions for the LM-ADDA loop.

The worker builds an `lmadda.training.adapt.Adapter` (the same loop `lmadda adapt` runs) with:
- the device Ray Train assigned (`ray.train.torch.get_device`),
- DDP around the trained prefix of G' and around the discriminators (`prepare_model`; gloo on CPU,
  NCCL on GPU, chosen by Ray), frozen layers excluded because they need no gradient,
- SyncBatchNorm for the trained layers when their BatchNorm trains (`bn_mode: train`) on >1 worker,
- crops sharded with `DistributedSampler`,
- the gate and collapse decisions averaged over workers, so all workers stop at the same step and
  call `ray.train.report` the same number of times,
- a checkpoint on every report (rank 0 writes it; Train V2 sets `Result.metrics` only from reports
  that carry one), and resumption from `ray.train.get_checkpoint()` after a failure.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import numpy as np

from lmadda.checkpoint import load_checkpoint, save_checkpoint
from lmadda.data.dataset import load_images
from lmadda.data.manifest import Manifest
from lmadda.data.shifts import Shift
from lmadda.errors import LmaddaError
from lmadda.evaluation import evaluate_generator
from lmadda.models.generator import UNetGenerator
from lmadda.training.adapt import AdaptConfig, Adapter

STATE_FILE = "adapter_state.pt"
GENERATOR_FILE = "generator.pt"


def labelled_pearson(generator: UNetGenerator, manifest: Manifest, setting: str, shift: Shift | None, source) -> dict[str, float]:
    """Pearson per marker on the target's labelled test split; empty when the target has no labels."""
    try:
        images = load_images(manifest, setting, "test", source.markers, shift=shift, percentiles=source.percentiles)
    except LmaddaError:
        return {}  # no paired target images: a label-free criterion has to choose
    rows = evaluate_generator(generator, images, source.markers)
    metrics = {f"pearson_{m}": float(np.nanmean([r["pearson"] for r in rows if r["marker"] == m])) for m in source.markers}
    metrics["pearson"] = float(np.nanmean(list(metrics.values())))
    return metrics


def _mean_over_workers(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).tolist()


def adaptation_worker(config: dict) -> None:
    """Run one LM-ADDA adaptation. `config` keys: source_checkpoint, manifest, source_setting,
    target_setting, shift (or None), adapt (AdaptConfig options), and tags (free-form, for metrics)."""
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device()
    distributed = world_size > 1

    source = load_checkpoint(config["source_checkpoint"])
    adapt_config = AdaptConfig(**{**config["adapt"], "device": str(device)})
    manifest = Manifest.load(config["manifest"])
    shift = Shift.parse(config["shift"]) if config.get("shift") else None
    source_images = load_images(manifest, config["source_setting"], "train", percentiles=source.percentiles)
    target_images = load_images(manifest, config["target_setting"], "train", shift=shift, percentiles=source.percentiles, seed=adapt_config.seed)

    sampler_factory = None
    prepare = None
    if distributed:
        def sampler_factory(dataset, epoch):
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=adapt_config.seed)
            sampler.set_epoch(epoch)
            return sampler

        def prepare(module):
            return ray.train.torch.prepare_model(module)

    adapter = Adapter(source, source_images, target_images, adapt_config, device=device, prepare=prepare,
                      sampler_factory=sampler_factory, sync_batchnorm=distributed,
                      reduce=_mean_over_workers if distributed else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            adapter.load_state_dict(torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False))

    target_name = config["target_setting"] + (f"+{shift}" if shift else "")
    tags = config.get("tags", {})
    while not adapter.finished:
        record = adapter.step()
        if record is None:
            continue
        metrics = {**record, "collapsed": float(record["collapsed"]), "d_saturated": float(record["d_saturated"]),
                   "done": float(adapter.finished), **tags}
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                torch.save(adapter.state_dict(), Path(folder) / STATE_FILE)
                result = adapter.finish()
                if adapter.finished:  # the last report carries the labelled evaluation, where labels exist
                    metrics.update(labelled_pearson(result.generator, manifest, config["target_setting"], shift, source))
                save_checkpoint(Path(folder) / GENERATOR_FILE, result.checkpoint(source, adapt_config, target_name, **tags))
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=report_checkpoint)
