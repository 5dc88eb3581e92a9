"""Which torch device a job runs on: one rule for training, adaptation, prediction, baselines and the endpoint."""

from __future__ import annotations

import torch

from lmadda.core.errors import LmaddaError


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """None or "auto": the first GPU when there is one, else the CPU; anything else as torch names it (cpu, cuda, cuda:1)."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LmaddaError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
