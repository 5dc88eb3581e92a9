"""Ray Train per-worker functions: source training and the LM-ADDA loop, data-parallel; and the grid-point
runner every sweep trial uses, in a worker group or in the trial's own process.

Both run the lmadda loops themselves (`train_source`, `Adapter`), not copies. In both, the
configured `batch_size` is the effective batch: each of N workers takes batch_size / N, so a result
does not depend on how many workers computed it.

`source_worker` runs `train_source` with DDP around G and D, SyncBatchNorm on >1 GPU worker, crops
sharded with `DistributedSampler`, and a checkpoint (loop state + best generator so far) reported
after every epoch, from which a restarted worker group resumes.

`run_points` adapts the grid points of one sweep trial one after another, each through the study's
trial function (`lmadda.study.trial.run_trial` on rank 0; `run_steps` on the other ranks). It loads
what they share once (the source model, the manifest, the source images; each target's images,
labelled test images and label-free probe while its points run), so a trial of several points pays
its start-up once. Every `log_every` steps it reports the point's metrics, tagged with the point's
key, and keeps the point's loop state in a `PointStore` folder; at the point's last report (its last
step, or its first report flagged collapsed: a collapse ends the point, never the rest of the trial)
it adds the evaluations, the adapted generator and the point's result rows (`rows.parquet`). A restarted trial re-reports the points it had finished
(without running them again) and resumes the one it was in from its state.

`adaptation_worker` runs `run_points` as a Ray Train worker with:
- the device Ray Train assigned (`ray.train.torch.get_device`),
- DDP around the trained prefix of G' and around the discriminators (`prepare_model`; gloo on CPU,
  NCCL on GPU, chosen by Ray), frozen layers excluded because they need no gradient,
- SyncBatchNorm for the trained layers when their BatchNorm trains (`bn_mode: train`) on >1 GPU worker,
- crops sharded with `DistributedSampler`,
- the gate and collapse decisions averaged over workers, so all workers stop at the same step and
  call `ray.train.report` the same number of times,
- the point store written by rank 0 (`store` in its config: a sweep's trials), or, for one
  adaptation run on its own, a Ray Train checkpoint on every report (Train V2 sets `Result.metrics`
  only from reports that carry one) and resumption from `ray.train.get_checkpoint()` after a failure.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from lmadda.checkpoint import GeneratorCheckpoint, LoopState, load_checkpoint, load_loop_state, save_checkpoint, save_loop_state
from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import LoadedImage, load_images
from lmadda.data.manifest import Manifest
from lmadda.data.shifts import Shift
from lmadda.evaluation.evaluate import SPLIT_SEED_OFFSET
from lmadda.evaluation.rows import TargetDomain, marker_means, rows_table
from lmadda.selection.criteria import SelectionProbe
from lmadda.study.trial import GridPoint, TrialResult, TrialTarget, run_trial
from lmadda.training.adapt import AdaptConfig, Adapter, run_steps
from lmadda.training.source import SourceHooks, SourceTrainConfig, load_source_data, source_checkpoint, train_source
from lmadda.sweep.trial_config import TrialPoint, TrialSpec

STATE_FILE = "adapter_state.pt"
SOURCE_STATE_FILE = "source_state.pt"
GENERATOR_FILE = "generator.pt"
ROWS_FILE = "rows.parquet"  # a finished point's result rows (lmadda.evaluation.rows), beside its generator


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
            resume = load_loop_state(state_file, "source", map_location=device,
                                     fix="train the source model again without resume_from (a sweep: delete its "
                                         "train/<sweep>-source folder)").state

    def report(record: dict, state: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:  # one copy of the state; every rank reports, so all report equally often
                save_loop_state(Path(folder) / SOURCE_STATE_FILE, "source", state)
                save_checkpoint(Path(folder) / GENERATOR_FILE, source_checkpoint(
                    train_config, state["best_generator"], train_images, state["history"], state["best_pearson"]))
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({**record, "done": float(record["epoch"] == train_config.epochs)}, checkpoint=report_checkpoint)

    train_source(train_config, progress=False, data=(train_images, val_images), hooks=hooks, resume=resume, on_epoch=report)


def labelled_test_images(manifest: Manifest, setting: str, shift: Shift | None, source: GeneratorCheckpoint,
                         seed: int) -> list[LoadedImage] | None:
    """The target's labelled test split, a seeded shift drawn as the study draws it for `seed`
    (`lmadda.evaluation.evaluate.SPLIT_SEED_OFFSET`), so a sweep and the study score the same images; None when the
    target has no paired images."""
    try:
        return load_images(manifest, setting, "test", source.markers, shift=shift, percentiles=source.percentiles,
                           seed=seed + SPLIT_SEED_OFFSET["test"])
    except LmaddaError:
        return None  # no paired target images: a label-free criterion has to choose


def _mean_over_workers(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).tolist()


class PointStore:
    """A trial's saved reports, one folder per grid point: `<root>/<point key>/step_<n>/`, holding the loop
    state (`adapter_state.pt`, with the report's metrics beside it) and, at the point's last report, the
    adapted generator (`generator.pt`). Each folder is written whole, then renamed; only the latest is kept."""

    durable = True  # its folders outlive the trial: a report may name them

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def latest(self, key: str) -> Path | None:
        folders = [p for p in (self.root / key).glob("step_*") if p.name[5:].isdigit()]
        return max(folders, key=lambda p: int(p.name[5:]), default=None)

    def keep(self, key: str, step: int, folder: Path) -> Path:
        point = self.root / key
        target, partial = point / f"step_{step}", point / f".step_{step}.partial"
        point.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(folder, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        for older in point.glob("step_*"):  # the latest only: the state to resume, the result to read
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
        return target


class _TrainCheckpointStore:
    """One adaptation run on its own under Ray Train: its latest Train checkpoint is the saved report."""

    durable = False  # a local copy, gone after the run

    def __init__(self, folder: Path | None):
        self.folder = folder

    def latest(self, key: str) -> Path | None:
        return self.folder


class _Target:
    """One target domain of a trial (a setting and its shift, and the seed of the shift's noise) and what its points share."""

    def __init__(self, trial: "TrialData", target: str, seed: int):
        self.key = (target, seed)
        self.domain = TargetDomain.parse(target)
        self.name = self.domain.name
        self.images = load_images(trial.manifest, self.domain.setting, "train", shift=self.domain.shift,
                                  percentiles=trial.source.percentiles, seed=seed)
        self.seed = seed
        self._test_images: list[LoadedImage] | None | bool = False  # False: not loaded yet
        self._probes: dict[int, SelectionProbe] = {}

    def test_images(self, trial: "TrialData") -> list[LoadedImage] | None:
        if self._test_images is False:
            self._test_images = labelled_test_images(trial.manifest, self.domain.setting, self.domain.shift, trial.source, self.seed)
        return self._test_images

    def probe(self, trial: "TrialData", crop_size: int) -> SelectionProbe:
        """The label-free criteria's fixed crops and source-side references (`lmadda.selection.criteria.SelectionProbe`)."""
        if crop_size not in self._probes:
            self._probes[crop_size] = SelectionProbe(trial.source.generator, trial.source_images, self.images,
                                                     crop_size=crop_size, seed=self.seed)
        return self._probes[crop_size]


class TrialData:
    """What every grid point of a trial shares, loaded once: the source model, the manifest, the source images,
    and the target of the points running now (the next target replaces it: one target's images at a time)."""

    def __init__(self, spec: TrialSpec):
        self.source = load_checkpoint(spec.source_checkpoint)
        self.manifest = Manifest.load(spec.manifest)
        self.source_setting = spec.source_setting
        self.source_images = load_images(self.manifest, self.source_setting, "train", percentiles=self.source.percentiles)
        self._target: _Target | None = None

    def target(self, target: str, seed: int) -> _Target:
        if self._target is None or self._target.key != (target, seed):
            self._target = None  # let the previous target's images go first
            self._target = _Target(self, target, seed)
        return self._target


Report = Callable[[dict, "Path | None"], None]


def run_points(spec: TrialSpec | dict, *, world_size: int, rank: int, device: torch.device, store, report: Report) -> None:
    """Adapt every grid point of `config` in turn (see the module docstring).

    `spec`: the trial's points and what they share (`lmadda.sweep.trial_config.TrialSpec`, or its dict).
    `store.latest(key)` is the folder of the point's latest saved report, or None. `report(metrics, folder)`
    gets a folder to keep (rank 0; valid only during the call) or None. Every report carries the point's key,
    the number of points in the trial, `steps_s` (the point's time inside adaptation steps) and `worker_s`
    (the point's time from its start, its evaluations included), so a sweep can tell training from overhead.
    """
    spec = TrialSpec.model_validate(spec)
    points = spec.points
    fix = "rerun this grid point from the start: delete {folder} (or rerun the sweep without --resume, under a new name)"
    # Every rank reads the saved reports before any rank writes one (rank 0 writes only after steps all ranks take).
    saved = [store.latest(point.key) for point in points]
    trial = TrialData(spec)
    for point, folder in zip(points, saved):
        state = load_loop_state(folder / STATE_FILE, "adapter", fix=fix.format(folder=folder.parent)) if folder else None
        if folder is not None and (folder / GENERATOR_FILE).is_file():  # finished before the trial restarted: report it, do not redo it
            metrics = dict(state.metadata["metrics"])
            if store.durable:
                metrics["checkpoint_path"] = str(folder)
            report(metrics, None)
            continue
        adapt_options = spec.adapt_options(point)
        target = trial.target(point.target, adapt_options.get("seed", AdaptConfig.model_fields["seed"].default))
        run_adaptation(trial, target, adapt_options, point, world_size=world_size, rank=rank, device=device, resume=state,
                       report=report, points_in_trial=len(points))


def run_adaptation(trial: TrialData, target: _Target, adapt_options: dict, point: TrialPoint, *, world_size: int, rank: int,
                   device: torch.device, resume: LoopState | None, report: Report, points_in_trial: int = 1) -> None:
    """One grid point: the study's trial function (`lmadda.study.trial.run_trial`) on the shared data, reporting
    every `log_every` steps (see `run_points`). Rank 0 measures the adapted model; the other ranks only step."""
    started = time.perf_counter()
    distributed = world_size > 1
    source = trial.source
    adapt_config = AdaptConfig(**{**adapt_options, "device": str(device)})
    effective_batch = adapt_config.batch_size
    adapt_config = adapt_config.model_copy(update={"batch_size": worker_batch(effective_batch, world_size)})
    sampler_factory = _distributed_sampler_factory(world_size, rank, adapt_config.seed) if distributed else None
    prepare = ray.train.torch.prepare_model if distributed else None
    adapter = Adapter(source, trial.source_images, target.images, adapt_config, device=device, prepare=prepare,
                      sampler_factory=sampler_factory, sync_batchnorm=sync_batchnorm(distributed, device),
                      reduce=_mean_over_workers if distributed else None)
    if resume is not None:
        adapter.load_state_dict(resume.state)
    steps_s = resume.metadata["metrics"]["steps_s"] if resume is not None else 0.0
    tags = {**point.tags, "point": point.key, "points_in_trial": points_in_trial}

    def send(record: dict, last: bool, outcome: TrialResult | None = None) -> None:
        metrics = {**record, "collapsed": float(record["collapsed"]), "d_saturated": float(record["d_saturated"]),
                   "point_done": float(last), **tags}  # not `done`: that one ends a Tune trial
        with tempfile.TemporaryDirectory() as folder:
            if outcome is not None:  # the last report carries the evaluations, the result rows and the generator
                metrics.update(marker_means(outcome.rows))
                metrics.update(outcome.criteria)
                save_checkpoint(Path(folder) / GENERATOR_FILE, outcome.adapted.checkpoint(
                    source, adapt_config.model_copy(update={"batch_size": effective_batch}), target.name, **point.tags))
                pq.write_table(rows_table(outcome.rows), Path(folder) / ROWS_FILE)
            metrics["worker_s"] = time.perf_counter() - started
            if rank == 0:
                save_loop_state(Path(folder) / STATE_FILE, "adapter", adapter.state_dict(), {"metrics": metrics})
            report(metrics, Path(folder) if rank == 0 else None)

    def step_report(record: dict) -> None:
        send(record, last=False)

    if rank == 0:
        family = "moments" if adapt_config.adversary == "moments" else "lmadda"
        identity = GridPoint(point.target, tuple(adapt_config.layer), adapt_config.lr, adapt_config.seed, adapt_config.recipe, family)
        row_tags = identity.tags(source.generator.last_layer)
        measured_on = TrialTarget(target.domain, source.markers, target.test_images(trial),
                                  target.probe(trial, adapt_config.crop_size))
        outcome = run_trial(adapter, measured_on, row_tags, on_record=step_report, steps_s=steps_s)
        send(outcome.last_record, last=True, outcome=outcome)
    else:  # a collapse ends the point on every rank at the same report: the flags are averaged over workers
        send(run_steps(adapter, step_report, end_on_collapse=True, steps_s=steps_s), last=True)


def adaptation_worker(config: dict) -> None:
    """Run `run_points` as a Ray Train worker. With `store` in `config` (a sweep trial's folder), rank 0 keeps
    every report in a `PointStore` there and reports carry its path; without, `config` describes one adaptation
    and every report carries a Ray Train checkpoint, from which a restarted worker group resumes."""
    spec = TrialSpec.model_validate(config)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    with contextlib.ExitStack() as stack:
        if spec.store is not None:
            store = PointStore(spec.store)

            def report(metrics: dict, folder: Path | None) -> None:
                if folder is not None:
                    metrics = {**metrics, "checkpoint_path": str(store.keep(metrics["point"], int(metrics["step"]), folder))}
                ray.train.report(metrics)
        else:
            if len(spec.points) > 1:
                raise LmaddaError("several grid points in one worker group need a `store` folder to keep each point's result")
            checkpoint = ray.train.get_checkpoint()
            store = _TrainCheckpointStore(Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None)

            def report(metrics: dict, folder: Path | None) -> None:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

        run_points(spec, world_size=context.get_world_size(), rank=rank, device=ray.train.torch.get_device(),
                   store=store, report=report)


def in_trial_adaptation(spec: TrialSpec, store_root: Path, device: torch.device) -> None:
    """Run `run_points` inside the Tune trial's own process, with no Ray Train worker group.

    For short trials on one device the worker group's start-up dominates (bench/sweep_overhead.py);
    here every report goes straight to Tune, with its folder kept in a `PointStore` under `store_root`,
    from which a restarted trial resumes.
    """
    from ray import tune

    store = PointStore(store_root)

    def report(metrics: dict, folder: Path | None) -> None:
        if folder is not None:
            metrics = {**metrics, "checkpoint_path": str(store.keep(metrics["point"], int(metrics["step"]), folder))}
        tune.report(metrics)

    run_points(spec, world_size=1, rank=0, device=device, store=store, report=report)
