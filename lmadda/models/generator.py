"""The pix2pix UNet generator as an explicit, indexed sequence of layers.

Same network as pytorch-CycleGAN-and-pix2pix `unet_256` (for depth 8): stride-2 4x4 convolutions down,
LeakyReLU(0.2) before every down conv but the first, BatchNorm on all but the outermost and innermost
down convs; transposed 4x4 convolutions up with ReLU before each, BatchNorm, dropout 0.5 on the three
decoder layers after the innermost one, skip concatenation [skip, up], Tanh at the end.

Unlike the reference's recursive block, every layer has an index, because LM-ADDA cuts the network
at a layer:

    layers 0 .. D-1      encoder; layer i outputs e_i at 1/2**(i+1) of the input size
    layers D .. 2D-1     decoder; layer D+j outputs d_j (before concatenation with its skip)

    d_0 = up_0(e_{D-1});  d_j = up_j(cat(e_{D-1-j}, d_{j-1}))  for j >= 1;  output = d_{D-1}

`forward_to(l, x)` runs layers 0..l and returns a `CutState`: the activation of layer l plus the
encoder outputs that layers after l still need (the skip tensors crossing the cut).
`forward_from(l, state)` runs layers l+1.. and returns the output, so that
`forward_from(l, forward_to(l, x)) == forward(x)` for every l.

`input_zoom` (1 by default) resamples every input by that factor before layer 0, and the output back to
the input's size after the last layer: the source model applied at the scale it was trained at, for a
target imaged with another objective or binning (lmadda.corrections.zoom estimates the factor without labels).
Every layer, cut and feature sees the resampled input, so a zoomed generator is used like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class GeneratorConfig(BaseModel):
    """Shape of the generator. The paper: ngf=64, depth=8 (16 layers) on 1024x1024 images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channels: int = Field(1, ge=1, description="input channels (1 for a grey label-free image)")
    out_channels: int = Field(1, ge=1, description="predicted markers")
    ngf: int = Field(64, ge=1, description="width: filters of the first layer")
    depth: int = Field(8, ge=2, le=10, description="down layers; the network has 2*depth layers")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout on the three decoder layers after the innermost")
    input_zoom: float = Field(1.0, ge=0.25, le=4.0, description="resample inputs by this factor first and outputs back "
                                                                  "(a target imaged at another scale; lmadda.corrections.zoom)")

    @property
    def num_layers(self) -> int:
        return 2 * self.depth

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this (each down layer halves the size)."""
        return 2**self.depth

    def encoder_channels(self, i: int) -> int:
        return self.ngf * min(2**i, 8)



@dataclass
class CutState:
    """What crosses a cut after layer `layer`: its activation and the pending skip tensors by encoder index."""

    layer: int
    activation: torch.Tensor
    skips: dict[int, torch.Tensor] = field(default_factory=dict)
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)  # outputs of layers asked for by `record`
    input_size: tuple[int, int] | None = None  # (H, W) before `input_zoom` resampled the input; None: not resampled

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor crossing the cut, named: 'activation' and 'skip<i>'."""
        named = {"activation": self.activation}
        named.update({f"skip{i}": t for i, t in sorted(self.skips.items())})
        return named


def _encoder_layer(config: GeneratorConfig, i: int) -> nn.Sequential:
    in_ch = config.in_channels if i == 0 else config.encoder_channels(i - 1)
    out_ch = config.encoder_channels(i)
    innermost = i == config.depth - 1
    parts: list[nn.Module] = []
    if i > 0:
        parts.append(nn.LeakyReLU(0.2, inplace=False))
    # BatchNorm follows, so the conv has no bias (as in the reference with BatchNorm).
    has_norm = 0 < i and not innermost
    parts.append(nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1, bias=not has_norm))
    if has_norm:
        parts.append(nn.BatchNorm2d(out_ch))
    return nn.Sequential(*parts)


def _decoder_layer(config: GeneratorConfig, j: int) -> nn.Sequential:
    depth = config.depth
    # d_0 sees the innermost code alone; later layers see cat(skip e_{D-1-j}, d_{j-1}), equal widths.
    in_ch = config.encoder_channels(depth - 1) if j == 0 else 2 * config.encoder_channels(depth - 1 - j)
    outermost = j == depth - 1
    out_ch = config.out_channels if outermost else config.encoder_channels(depth - 2 - j)
    parts: list[nn.Module] = [nn.ReLU(inplace=False)]
    if outermost:
        parts += [nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1), nn.Tanh()]
    else:
        parts += [nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch)]
        if 1 <= j <= 3 and config.dropout > 0:
            parts.append(nn.Dropout(config.dropout))
    return nn.Sequential(*parts)


class UNetGenerator(nn.Module):
    """pix2pix UNet with indexed layers; see the module docstring for the numbering."""

    def __init__(self, config: GeneratorConfig = GeneratorConfig()):
        super().__init__()
        self.config = config
        depth = config.depth
        self.layers = nn.ModuleList(
            [_encoder_layer(config, i) for i in range(depth)] + [_decoder_layer(config, j) for j in range(depth)]
        )

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def last_layer(self) -> int:
        return self.config.num_layers - 1

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            from lmadda.core.errors import LmaddaError

            raise LmaddaError(f"layer {layer} does not exist: this generator has layers 0..{self.last_layer}")
        return layer

    def check_input(self, x: torch.Tensor) -> None:
        from lmadda.core.errors import LmaddaError

        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise LmaddaError(f"generator expects (N, {self.config.in_channels}, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[2] % self.config.multiple or x.shape[3] % self.config.multiple:
            raise LmaddaError(
                f"input size {x.shape[2]}x{x.shape[3]} is not a multiple of {self.config.multiple} (2**depth); "
                "crop or tile to a multiple (lmadda predict tiles automatically)"
            )

    def _pending_skips(self, layer: int) -> range:
        """Encoder indices whose outputs layers after `layer` still need."""
        depth = self.config.depth
        if layer < depth:
            return range(0, min(layer, depth - 1))  # e_0..e_{layer-1}; e_layer is the activation itself
        j = layer - depth
        return range(0, depth - 1 - j)  # e_0 .. e_{D-2-j}

    def forward_to(self, layer: int, x: torch.Tensor, record: tuple[int, ...] = ()) -> CutState:
        """Run layers 0..`layer` and stop; return the activation there and the skip tensors later layers need.

        `record` names earlier layers whose outputs to keep too (multi-layer matching).
        """
        self.check_layer(layer)
        for r in record:
            if not 0 <= r <= layer:
                raise ValueError(f"cannot record layer {r} when stopping at layer {layer}")
        depth = self.config.depth
        encoder_outputs: list[torch.Tensor] = []
        recorded: dict[int, torch.Tensor] = {}
        input_size = None if self.config.input_zoom == 1.0 else (x.shape[-2], x.shape[-1])
        h = x if input_size is None else self._zoom_in(x)
        for i in range(min(layer, depth - 1) + 1):
            h = self.layers[i](h)
            encoder_outputs.append(h)
            if i in record:
                recorded[i] = h
        if layer >= depth:
            h = self.layers[depth](encoder_outputs[depth - 1])
            if depth in record:
                recorded[depth] = h
            for j in range(1, layer - depth + 1):
                h = self.layers[depth + j](torch.cat([encoder_outputs[depth - 1 - j], h], dim=1))
                if depth + j in record:
                    recorded[depth + j] = h
        skips = {i: encoder_outputs[i] for i in self._pending_skips(layer)}
        if layer == self.last_layer and input_size is not None:  # the output: back at the input's size
            h = self._zoom_out(h, input_size)
        return CutState(layer=layer, activation=h, skips=skips, recorded=recorded, input_size=input_size)

    def forward_from(self, layer: int, state: CutState) -> torch.Tensor:
        """Run layers `layer`+1 .. last from a `CutState` made at `layer`."""
        self.check_layer(layer)
        if state.layer != layer:
            raise ValueError(f"state was cut at layer {state.layer}, not {layer}")
        depth = self.config.depth
        skips = dict(state.skips)
        h = state.activation
        if layer < depth:
            skips[layer] = h  # the activation at an encoder cut is also a later skip
            for i in range(layer + 1, depth):
                h = self.layers[i](h)
                skips[i] = h
            h = self.layers[depth](h)
            start = 1
        else:
            start = layer - depth + 1
        for j in range(start, depth):
            h = self.layers[depth + j](torch.cat([skips[depth - 1 - j], h], dim=1))
        if state.input_size is not None and layer != self.last_layer:
            h = self._zoom_out(h, state.input_size)
        return h

    def _zoom_in(self, x: torch.Tensor) -> torch.Tensor:
        """Resample by `input_zoom` (antialiased when shrinking), then pad bottom and right to a multiple of 2**depth."""
        height, width = zoomed_size((x.shape[-2], x.shape[-1]), self.config.input_zoom)
        h = resize(x, (height, width))
        multiple = self.config.multiple
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:  # mirrored where the image is large enough, as predict_tiled pads; else repeated edges
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            h = F.pad(h, (0, pad_w, 0, pad_h), mode=mode)
        return h

    def _zoom_out(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The output of a zoomed input, its padding cut off, resampled back to the input's `size`."""
        height, width = zoomed_size(size, self.config.input_zoom)
        return resize(y[..., :height, :width], size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.last_layer, self.forward_to(self.last_layer, x))

    def layer_parameters(self, upto: int) -> list[nn.Parameter]:
        """Parameters of layers 0..`upto`: what LM-ADDA trains when matching at `upto`."""
        return [p for layer in self.layers[: upto + 1] for p in layer.parameters()]


def zoomed_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """(H, W) of an image of `size` resampled by `factor`."""
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) resampled to `size`: bilinear, antialiased where it shrinks (the one resampling of `input_zoom` and
    lmadda.corrections.zoom, so the zoom estimated is the zoom applied)."""
    shrinks = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinks)


def zoomed(generator: UNetGenerator, factor: float) -> UNetGenerator:
    """A generator with `generator`'s weights (a copy) that resamples its inputs by `factor` (`GeneratorConfig.input_zoom`)."""
    result = UNetGenerator(GeneratorConfig.model_validate({**generator.config.model_dump(), "input_zoom": float(factor)}))
    result.load_state_dict(generator.state_dict())
    return result.train(generator.training)


def build_generator(**options) -> UNetGenerator:
    """A generator from plain keyword options (`GeneratorConfig`'s fields), untrained: the callable a BioImage Model
    Zoo package names to rebuild the architecture for its state dict (`lmadda export`)."""
    return UNetGenerator(GeneratorConfig(**options))


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """pix2pix 'normal' init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
