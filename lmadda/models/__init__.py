"""Networks: the layer-indexed pix2pix UNet generator, the discriminators, and the tiled forward that runs a
generator over an image of any size."""

from lmadda.models.discriminators import FeatureDiscriminator, PatchDiscriminator
from lmadda.models.generator import CutState, GeneratorConfig, UNetGenerator

__all__ = ["CutState", "FeatureDiscriminator", "GeneratorConfig", "PatchDiscriminator", "UNetGenerator"]
