"""Ray Train per-worker functions: source training and the LM-ADDA loop, data-parallel.

Both run the lmadda loops themselves (`train_source`, `Adapter`), not copies. In both, the
configured `batch_size` is the effective batch: each of N workers takes batch_size / N, so a result
does not depend on how many workers computed it.

`source_worker` runs `train_source` with DDP around G and D, SyncBatchNorm on >1 GPU worker, crops
sharded with `DistributedSampler`, and a checkpoint (loop state + best generator so far) reported
after every epoch, from which a restarted worker group resumes.

`adaptation_worker` builds an `lmadda.training.adapt.Adapter` (the same loop `lmadda adapt` runs) with:
- the device Ray Train assigned (`ray.train.torch.get_device`),
- DDP around the trained prefix of G' and around the discriminators (`prepare_model`; gloo on CPU,
  NCCL on GPU, chosen by Ray), frozen layers excluded because they need no gradient,
- SyncBatchNorm for the trained layers when their BatchNorm trains (`bn_mode: train`) on >1 GPU worker,
- crops sharded with `DistributedSampler`,
- the gate and collapse decisions averaged over workers, so all workers stop at the same step and
  call `ray.train.report` the same number of times,
- a checkpoint on every report (rank 0 writes it; Train V2 sets `Result.metrics` only from reports
  that carry one), and resumption from `ray.train.get_checkpoint()` after a failure.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Callable
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
from lmadda.selection import label_free_criteria
from lmadda.models.generator import UNetGenerator
from lmadda.training.adapt import AdaptConfig, Adapter
from lmadda.training.source import SourceHooks, SourceTrainConfig, load_source_data, source_checkpoint, train_source

STATE_FILE = "adapter_state.pt"
SOURCE_STATE_FILE = "source_state.pt"
GENERATOR_FILE = "generator.pt"


def worker_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise LmaddaError(f"batch_size {batch_size} must be a multiple of the number of workers ({world_size}): "
                          "it is the effective batch, split evenly over the workers")
    return batch_size // world_size


def sync_batchnorm(distributed: bool, device: torch.device) -> bool:
    """SyncBatchNorm on GPU workers only: PyTorch's SyncBatchNorm does not run on CPU (gloo), where
    each worker's BatchNorm normalises by its own share of the batch (statistics of batch/N images)."""
    return distributed and device.type == "cuda"


def _distributed_sampler_factory(world_size: int, rank: int, seed: int):
    def sampler_factory(dataset, epoch):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return sampler

    return sampler_factory


def source_worker(config: dict) -> None:
    """Train a source model. `config` keys: train (SourceTrainConfig options), optional resume_from
    (the folder of a checkpoint this worker reported earlier)."""
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device()
    distributed = world_size > 1
    train_config = SourceTrainConfig(**{**config["train"], "device": str(device)})
    _, train_images, val_images = load_source_data(train_config)
    hooks = SourceHooks(
        prepare=ray.train.torch.prepare_model if distributed else None,
        sampler_factory=_distributed_sampler_factory(world_size, rank, train_config.seed) if distributed else None,
        world_size=world_size, sync_batchnorm=sync_batchnorm(distributed, device), device=device,
    )
    # After a worker failure Ray Train hands back the run's latest checkpoint; otherwise training may
    # continue from an earlier run's checkpoint folder (`resume_from`), e.g. to add epochs.
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(str(config["resume_from"]))
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state_file = Path(folder) / SOURCE_STATE_FILE
            if not state_file.is_file():
                raise LmaddaError(f"{checkpoint.path} holds no {SOURCE_STATE_FILE}; resume from a checkpoint of a source-training run")
            resume = torch.load(state_file, map_location=device, weights_only=False)

    def report(record: dict, state: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:  # one copy of the state; every rank reports, so all report equally often
                torch.save(state, Path(folder) / SOURCE_STATE_FILE)
                save_checkpoint(Path(folder) / GENERATOR_FILE, source_checkpoint(
                    train_config, state["best_generator"], train_images, state["history"], state["best_pearson"]))
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({**record, "done": float(record["epoch"] == train_config.epochs)}, checkpoint=report_checkpoint)

    train_source(train_config, progress=False, data=(train_images, val_images), hooks=hooks, resume=resume, on_epoch=report)


def labelled_pearson(generator: UNetGenerator, manifest: Manifest, setting: str, shift: Shift | None, source,
                     input_transform=None) -> dict[str, float]:
    """Pearson per marker on the target's labelled test split; empty when the target has no labels."""
    try:
        images = load_images(manifest, setting, "test", source.markers, shift=shift, percentiles=source.percentiles)
    except LmaddaError:
        return {}  # no paired target images: a label-free criterion has to choose
    rows = evaluate_generator(generator, images, source.markers, input_transform=input_transform)
    metrics = {f"pearson_{m}": float(np.nanmean([r["pearson"] for r in rows if r["marker"] == m])) for m in source.markers}
    metrics["pearson"] = float(np.nanmean(list(metrics.values())))
    return metrics


def _mean_over_workers(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).tolist()


def adaptation_worker(config: dict) -> None:
    """Run one LM-ADDA adaptation as a Ray Train worker (see `run_adaptation` for `config`)."""
    context = ray.train.get_context()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)

    def report(metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    run_adaptation(config, world_size=context.get_world_size(), rank=context.get_world_rank(),
                   device=ray.train.torch.get_device(), resume=resume, report=report)


def run_adaptation(config: dict, *, world_size: int, rank: int, device: torch.device, resume: dict | None,
                   report: Callable[[dict, Path | None], None]) -> None:
    """One LM-ADDA adaptation, reporting every `log_every` steps.

    `config` keys: source_checkpoint, manifest, source_setting, target_setting, shift (or None),
    adapt (AdaptConfig options), and tags (free-form, for metrics). `report(metrics, folder)` gets a
    folder holding the loop state and the adapted generator on rank 0 (None elsewhere), valid only
    during the call. Reports carry `worker_s` (since this function started) and `steps_s` (inside
    the loop's steps), so a sweep can tell training time from start-up and evaluation overhead.
    """
    started = time.perf_counter()
    distributed = world_size > 1
    source = load_checkpoint(config["source_checkpoint"])
    adapt_config = AdaptConfig(**{**config["adapt"], "device": str(device)})
    effective_batch = adapt_config.batch_size
    adapt_config = adapt_config.model_copy(update={"batch_size": worker_batch(effective_batch, world_size)})
    manifest = Manifest.load(config["manifest"])
    shift = Shift.parse(config["shift"]) if config.get("shift") else None
    source_images = load_images(manifest, config["source_setting"], "train", percentiles=source.percentiles)
    target_images = load_images(manifest, config["target_setting"], "train", shift=shift, percentiles=source.percentiles, seed=adapt_config.seed)

    sampler_factory = _distributed_sampler_factory(world_size, rank, adapt_config.seed) if distributed else None
    prepare = ray.train.torch.prepare_model if distributed else None
    adapter = Adapter(source, source_images, target_images, adapt_config, device=device, prepare=prepare,
                      sampler_factory=sampler_factory, sync_batchnorm=sync_batchnorm(distributed, device),
                      reduce=_mean_over_workers if distributed else None)
    if resume is not None:
        adapter.load_state_dict(resume)

    target_name = config["target_setting"] + (f"+{shift}" if shift else "")
    tags = config.get("tags", {})
    steps_s = 0.0
    while not adapter.finished:
        step_started = time.perf_counter()
        record = adapter.step()
        steps_s += time.perf_counter() - step_started
        if record is None:
            continue
        metrics = {**record, "collapsed": float(record["collapsed"]), "d_saturated": float(record["d_saturated"]),
                   "done": float(adapter.finished), "steps_s": steps_s, "worker_s": time.perf_counter() - started, **tags}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save(adapter.state_dict(), Path(folder) / STATE_FILE)
                result = adapter.finish()
                if adapter.finished:  # the last report carries the evaluations: labelled where labels exist, label-free always
                    metrics.update(labelled_pearson(result.generator, manifest, config["target_setting"], shift, source,
                                                    result.input_correction))
                    criteria = label_free_criteria(source.generator, result.generator, source_images, target_images,
                                                   crop_size=adapt_config.crop_size, seed=adapt_config.seed,
                                                   input_transform=result.input_correction)
                    metrics.update({f"lf_{name}": value for name, value in criteria.items()})
                save_checkpoint(Path(folder) / GENERATOR_FILE, result.checkpoint(
                    source, adapt_config.model_copy(update={"batch_size": effective_batch}), target_name, **tags))
            report(metrics, Path(folder) if rank == 0 else None)


def in_trial_adaptation(config: dict, checkpoints: Path, device: torch.device) -> None:
    """Run one adaptation inside the Tune trial's own process, with no Ray Train worker group.

    For short trials on one device the worker group's start-up dominates (bench/sweep_overhead.py);
    here every report goes straight to Tune, with the checkpoint copied under `checkpoints`
    (step_<n>/, written whole then renamed; older ones removed), from which a restarted trial resumes.
    """
    from ray import tune

    checkpoints.mkdir(parents=True, exist_ok=True)
    done = sorted((p for p in checkpoints.glob("step_*") if (p / GENERATOR_FILE).is_file()), key=lambda p: int(p.name[5:]))
    resume = torch.load(done[-1] / STATE_FILE, map_location="cpu", weights_only=False) if done else None

    def report(metrics: dict, folder: Path | None) -> None:
        target = checkpoints / f"step_{int(metrics['step'])}"
        partial = checkpoints / f".step_{int(metrics['step'])}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(folder, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        for older in checkpoints.glob("step_*"):  # keep the latest only: the state to resume, the result to read
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
        tune.report({**metrics, "checkpoint_path": str(target)})

    run_adaptation(config, world_size=1, rank=0, device=device, resume=resume, report=report)
