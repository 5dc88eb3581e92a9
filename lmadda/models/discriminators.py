"""Discriminators: the pix2pix PatchGAN for source training, and feature discriminators for adaptation."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    """The 70x70 PatchGAN of pix2pix (n_layers=3) on concat(input image, target or prediction)."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        parts: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        multiplier = 1
        for n in range(1, n_layers + 1):
            previous, multiplier = multiplier, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            parts += [
                nn.Conv2d(ndf * previous, ndf * multiplier, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * multiplier),
                nn.LeakyReLU(0.2),
            ]
        parts.append(nn.Conv2d(ndf * multiplier, 1, 4, 1, 1))
        self.model = nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class FeatureDiscriminator(nn.Module):
    """Classifies a layer's activations as source or target; its shape follows the layer.

    Large maps (>= 8 pixels) get a small convolutional PatchGAN: strided 4x4 convs down to about 4x4
    patches (at most `max_down` of them), then a 3x3 conv to one logit per patch. Maps of 1x1 to 4x4
    near the bottleneck get a per-position MLP (1x1 convs), as in ADDA's 500-500-1 discriminator.
    No BatchNorm: source and target batches pass separately, and batch statistics would leak the
    domain label. Spectral norm is an option for stability.
    """

    def __init__(self, channels: int, spatial: int, width: int = 64, max_down: int = 3, use_spectral_norm: bool = False):
        super().__init__()
        wrap = spectral_norm if use_spectral_norm else (lambda m: m)
        parts: list[nn.Module] = []
        if spatial >= 8:
            downs = min(max_down, max(1, int(math.log2(spatial // 4))))
            previous = channels
            for n in range(downs):
                out = width * min(2**n, 2)  # stay narrow: on 128x128 maps, D would otherwise cost more than G'
                parts += [wrap(nn.Conv2d(previous, out, 4, 2, 1)), nn.LeakyReLU(0.2)]
                previous = out
            parts.append(wrap(nn.Conv2d(previous, 1, 3, 1, 1)))
            self.kind = f"conv-patchgan({downs} down)"
        else:
            parts += [
                wrap(nn.Conv2d(channels, width * 2, 1)), nn.LeakyReLU(0.2),
                wrap(nn.Conv2d(width * 2, width * 2, 1)), nn.LeakyReLU(0.2),
                wrap(nn.Conv2d(width * 2, 1, 1)),
            ]
            self.kind = "mlp"
        self.model = nn.Sequential(*parts)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)
