"""Small pieces both loops share: seeding, devices, endless loaders."""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(precision: str, device: torch.device):
    """The forward-pass context of a loop: bf16 autocast (CPU and recent GPUs), or nothing for fp32.

    Losses that autocast keeps in fp32 (binary cross-entropy, L1 on fp32 targets) stay fp32, and
    weights and optimiser states stay fp32: only activations and matmuls run in bf16.
    """
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def endless(dataset: Dataset, batch_size: int, seed: int, sampler_factory=None, first_epoch: int = 0, skip: int = 0) -> Iterator:
    """Batches forever; each pass is a new epoch of the (epoch-aware) dataset and sampler.

    `skip`: batches passed over first, so a resumed loop draws the batches an uninterrupted one would
    (whole epochs are passed over without loading a crop; each epoch's order depends only on its number).
    """
    epoch = first_epoch
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler = sampler_factory(dataset, epoch) if sampler_factory else None
        generator = torch.Generator().manual_seed(seed + epoch)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True, generator=generator)
        if skip and len(loader) and skip >= len(loader):
            skip -= len(loader)
            epoch += 1
            continue
        yielded = False
        for batch in loader:
            yielded = True
            if skip:
                skip -= 1
                continue
            yield batch
        if not yielded:
            raise ValueError(f"dataset of {len(dataset)} items yields no batch of {batch_size}")
        epoch += 1
