"""Networks: the layer-indexed pix2pix UNet generator and the discriminators."""

from lmadda.models.discriminators import FeatureDiscriminator, PatchDiscriminator
from lmadda.models.generator import CutState, GeneratorConfig, UNetGenerator

__all__ = ["CutState", "FeatureDiscriminator", "GeneratorConfig", "PatchDiscriminator", "UNetGenerator"]
