"""Ray Train around the lmadda loops: data parallelism changes nothing but the speed (marked slow)."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import Sampler

pytestmark = pytest.mark.slow


class ShardUnion(Sampler):
    """One process's view of what N DistributedSampler workers draw together: batch k holds every
    worker's k-th batch, so a batch of N*b here is the union of the workers' batches of b."""

    def __init__(self, length: int, world: int, per_worker: int, seed: int, epoch: int):
        self.length, self.world, self.per_worker, self.seed, self.epoch = length, world, per_worker, seed, epoch

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        shards = [order[rank::self.world] for rank in range(self.world)]  # DistributedSampler's split
        for k in range(len(shards[0]) // self.per_worker):
            for shard in shards:
                yield from shard[k * self.per_worker:(k + 1) * self.per_worker]

    def __len__(self) -> int:
        return self.length


def test_two_ddp_workers_adapt_exactly_as_one_process_with_the_same_effective_batch(ray_session, tiny_synth, tiny_source, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lmadda.checkpoint import load_checkpoint
    from lmadda.data.dataset import load_images
    from lmadda.data.manifest import Manifest
    from lmadda.training.adapt import AdaptConfig, Adapter
    from lmadda_tune.train_workers import GENERATOR_FILE, adaptation_worker

    # A fast D with two warm-up steps gives G' gradients well above float rounding: Adam divides each
    # gradient by its own size, so near-zero gradients would turn summation-order noise into steps.
    adapt = {"layer": [3], "steps": 6, "batch_size": 4, "crop_size": 64, "log_every": 3, "lr": 1e-3, "d_lr": 1e-2,
             "gate_accuracy": None, "d_warmup_steps": 2, "seed": 5}
    loop_config = {"source_checkpoint": str(tiny_source), "manifest": str(tiny_synth.source), "source_setting": "phase_contrast",
                   "target": "bright_field", "adapt": adapt, "tags": {"layer": 3}}
    result = TorchTrainer(adaptation_worker, train_loop_config=loop_config,
                          scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                          run_config=RunConfig(name="ddp", storage_path=str(tmp_path))).fit()
    assert result.error is None and result.metrics["step"] == 6
    with result.checkpoint.as_directory() as folder:
        distributed = load_checkpoint(Path(folder) / GENERATOR_FILE)
    assert distributed.metadata["adapt_config"]["batch_size"] == 4  # recorded as the effective batch

    source = load_checkpoint(tiny_source)
    manifest = Manifest.load(tiny_synth.source)
    config = AdaptConfig(**adapt, device="cpu")
    source_images = load_images(manifest, "phase_contrast", "train", percentiles=source.percentiles)
    target_images = load_images(manifest, "bright_field", "train", percentiles=source.percentiles, seed=config.seed)
    def adapted(sampler_factory) -> dict:
        adapter = Adapter(source, source_images, target_images, config, sampler_factory=sampler_factory)
        while not adapter.finished:
            adapter.step()
        return adapter.finish().generator.state_dict()

    def relative_distance(weights: dict, reference: dict) -> float:
        """|weights - reference| over how far the reference moved from the source model (all float tensors)."""
        start = source.generator.state_dict()
        names = [k for k, v in reference.items() if v.is_floating_point()]
        apart = sum(((weights[k] - reference[k]).double() ** 2).sum() for k in names)
        moved = sum(((reference[k] - start[k]).double() ** 2).sum() for k in names)
        return float((apart / moved).sqrt())

    same_batches = adapted(lambda dataset, epoch: ShardUnion(len(dataset), 2, 2, config.seed, epoch))
    other_batches = adapted(None)  # the control: one process drawing its own batches
    assert relative_distance(distributed.generator.state_dict(), same_batches) < 0.01
    assert relative_distance(other_batches, same_batches) > 0.3  # so the agreement above is not a given


def test_source_training_runs_on_two_ddp_workers_and_resumes_from_its_checkpoint(ray_session, tiny_synth, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lmadda.checkpoint import load_checkpoint
    from lmadda_tune.train_workers import GENERATOR_FILE, source_worker

    train = {"manifest": str(tiny_synth.source), "markers": ["dapi"], "ngf": 4, "depth": 6, "ndf": 4, "crop_size": 64,
             "batch_size": 4, "crops_per_epoch": 8, "epochs": 1}
    scaling = ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})
    first = TorchTrainer(source_worker, train_loop_config={"train": train}, scaling_config=scaling,
                         run_config=RunConfig(name="source-1", storage_path=str(tmp_path))).fit()
    assert first.error is None and first.metrics["epoch"] == 1 and first.metrics["done"] == 1.0

    # Two epochs, resumed from the one-epoch checkpoint: only epoch 2 runs, epoch 1 is carried over.
    second = TorchTrainer(source_worker, train_loop_config={"train": {**train, "epochs": 2}, "resume_from": first.checkpoint.path},
                          scaling_config=scaling,
                          run_config=RunConfig(name="source-2", storage_path=str(tmp_path))).fit()
    assert second.error is None and second.metrics["epoch"] == 2
    with second.checkpoint.as_directory() as folder:
        model = load_checkpoint(Path(folder) / GENERATOR_FILE)
    history = model.metadata["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[0]["val_pearson"] == pytest.approx(first.metrics["val_pearson"])
    prediction = model.generator(torch.zeros(1, 1, 64, 64))
    assert prediction.shape == (1, 1, 64, 64) and torch.isfinite(prediction).all()
