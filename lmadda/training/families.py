"""The trained adaptation families, by name: what each trains, with which config, by which loop.

| family                              | what trains layers 0..l                                   | config           |
|-------------------------------------|-----------------------------------------------------------|------------------|
| `lmadda`                            | LM-ADDA: G' fools a discriminator at layer l (the paper)   | `AdaptConfig`    |
| `moments`                           | G' matches the source's feature mean and covariance at l   | `AdaptConfig` (adversary: moments) |
| `self_training`                     | a mean teacher's confident stains teach G'                 | `SelfTrainConfig` |
| `histogram_matching+self_training`  | the same on histogram-matched inputs (a composite)         | `SelfTrainConfig` |

The families without an adversary run at their own fixed learning rate (`FAMILY_LR`, set before any
measurement: the usual Adam rate for fine-tuning a pix2pix generator, half pix2pix's 2e-4), since the
LM-ADDA rate (2e-5) is tuned to a discriminator's gradients. They share LM-ADDA's step budget, batch,
crop, seed and device, so a comparison at one layer spends the same number of steps.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import LoadedImage
from lmadda.training.adapt import AdaptConfig, Adapter
from lmadda.training.self_training import SelfTrainConfig, SelfTrainer

FAMILIES = ("lmadda", "moments", "self_training", "histogram_matching+self_training")
FAMILY_LR = {"moments": 1e-4, "self_training": 1e-4, "histogram_matching+self_training": 1e-4}
# What self-training takes from the grid's shared (LM-ADDA) options: the budget, not the adversary's settings.
SHARED_WITH_SELF_TRAINING = ("steps", "batch_size", "crop_size", "device", "precision", "log_every")

# What turns an LM-ADDA config into moment matching: no discriminator, and no input correction (its own
# composite is not a family here).
MOMENT_OPTIONS = {"adversary": "moments", "input_correction": None}

FamilyConfig = Union[AdaptConfig, SelfTrainConfig]
Loop = Union[Adapter, SelfTrainer]


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise LmaddaError(f"unknown adaptation family {family!r}; known: {', '.join(FAMILIES)}")
    return family


def family_config(family: str, shared: Mapping[str, Any], layer: int, seed: int, lr: float | None = None) -> FamilyConfig:
    """The validated config of `family` at `layer` (layers 0..layer train), from the grid's shared LM-ADDA options."""
    check_family(family)
    lr = lr if lr is not None else FAMILY_LR.get(family)
    if family in ("lmadda", "moments"):
        options = {**shared, "layer": [layer], "seed": seed, **({"lr": lr} if lr is not None else {})}
        if family == "moments":
            options.update(MOMENT_OPTIONS)
        return AdaptConfig.model_validate(options)
    options = {k: v for k, v in shared.items() if k in SHARED_WITH_SELF_TRAINING}
    correction = "histogram_matching" if family.startswith("histogram_matching+") else None
    return SelfTrainConfig.model_validate({**options, "layer": [layer], "seed": seed, "lr": lr, "input_correction": correction})


def make_loop(config: FamilyConfig, source: GeneratorCheckpoint, source_images: list[LoadedImage],
              target_images: list[LoadedImage]) -> Loop:
    """The stepping loop of a family's config: the Adapter (LM-ADDA, moments) or the SelfTrainer."""
    if isinstance(config, SelfTrainConfig):
        return SelfTrainer(source, source_images, target_images, config)
    return Adapter(source, source_images, target_images, config)
