"""Is this image in domain? A per-image domain score from the prediction's own forward pass.

A virtual-staining model fails silently when the microscope setting changes: it still returns a
confident-looking stain. Every checkpoint therefore carries a compact *domain reference*: what the
model's features look like on the images it was trained (or adapted) on.

    features of a tile   for each encoder layer l and channel c: the channel's spatial mean and log
                         spatial std of the layer-l activation (the statistics a shift moves first);
                         the same of the prediction itself (the output layer, one channel per marker)
    reference            per feature: mean and spread over fixed crops of the training images, and
                         per layer the PRINCIPAL_DIRECTIONS main directions in which those crops vary
    layer distance d_l   the image's tile-averaged features in units of the reference spread, its
                         main in-domain directions projected out, root-mean-square over layer l's features
    score                the mean over encoder layers of d_l / level_l (level_l: d_l's median on held-out
                         images of the same domain), averaged with the output layer's ratio: about 1 in
                         domain, growing with the shift. The encoder sees how far the input moved; the
                         stain's own statistics see what that did to the prediction (docs/domain_check.md:
                         on the study's trained model this raised the Spearman correlation with the
                         Pearson lost from 0.75 to 0.88, and changed nothing on two quick models)
    verdict              in_domain up to the borderline threshold, out_of_domain above the out
                         threshold, borderline between

The thresholds come from held-out images of the domain (the validation fields), each scored exactly
as `lmadda predict` scores an image: on the log scale of their scores, borderline BORDERLINE_Z and
out of domain OUT_Z robust standard deviations above their median. They hold for images of about
the held-out images' size; an image of fewer tiles averages fewer of them and scores noisier.
docs/domain_check.md has what they give on simulated shifts and on sephaCe.

The features come from `UNetGenerator.forward_to(last_layer, record=layers)`, which *is* the forward
pass (no hooks, no second pass), so scoring costs a channel mean and std per recorded layer.
The reference is plain tensors, numbers and strings, so checkpoints still load with weights_only=True.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from lmadda.core.errors import LmaddaError
from lmadda.models.generator import UNetGenerator
from lmadda.models.tiling import predict_tiled

REFERENCE_FORMAT = "lmadda-domain-reference"
REFERENCE_VERSION = 2  # 2: the output layer joins the score (version-1 references score on the encoder alone)
VERDICTS = ("in_domain", "borderline", "out_of_domain")
BORDERLINE_Z = 3.0  # robust standard deviations of held-out log scores: about 1 in 700 in-domain images if log-normal
OUT_Z = 6.0
SPREAD_FLOOR = 0.15  # smallest spread of held-out log scores assumed: borderline >= 1.57x, out >= 2.46x their median
PRINCIPAL_DIRECTIONS = 2  # per layer, directions of natural in-domain variation left out of the distance
INPUT_QUANTILES = 101  # the reference's input intensity distribution, for diagnose's input-correction check
_STD_FLOOR = 1e-3  # a channel that is flat on a tile would give log(0)
Transform = Callable[[np.ndarray], np.ndarray]


def layer_channels(generator: UNetGenerator, layer: int) -> int:
    """Channels of layer `layer`'s output (see the layer numbering in lmadda.models.generator)."""
    config, depth = generator.config, generator.config.depth
    if layer < depth:
        return config.encoder_channels(layer)
    j = layer - depth
    return config.out_channels if j == depth - 1 else config.encoder_channels(depth - 2 - j)


def reference_layers(generator: UNetGenerator) -> list[int]:
    """The encoder, 0..D-1, and the output layer. A shift of the input enters in the encoder (`lmadda diagnose` says at
    which layer); the inner decoder layers only inherit it (recording them cost the endpoint about a tenth more time for
    no better score), while the prediction's own statistics tell how much the shift changed the stain."""
    return [*range(generator.config.depth), generator.last_layer]


def _layer_features(activation: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 2C): per-channel spatial mean and log spatial std.

    From the mean and the mean of squares: two plain reductions, about 20x faster on CPU than
    `torch.var_mean` (measured on a 4 x 32 x 64 x 64 activation), so the score stays small next to the
    convolutions; activations are of order 1, so float32 loses nothing that matters here.
    """
    flat = activation.float().flatten(2)
    mean = flat.mean(dim=2)
    variance = ((flat * flat).mean(dim=2) - mean * mean).clamp_min(0.0)
    return torch.cat([mean, torch.log(variance.sqrt() + _STD_FLOOR)], dim=1)


def forward_with_features(generator: UNetGenerator, x: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's output and each input tile's features at `layers`, from one forward pass.

    `forward_to(last_layer)` returns the output as its activation (`forward_from` at the last layer is
    the identity), so this is `generator(x)` plus the statistics of the recorded layer outputs.
    """
    state = generator.forward_to(generator.last_layer, x, record=tuple(layers))
    features = torch.cat([_layer_features(state.recorded[layer]) for layer in layers], dim=1)
    return state.activation, features


@dataclass(frozen=True)
class DomainScore:
    """One image's domain check: a distance per layer (1 = the held-out in-domain level), the score and the verdict."""

    score: float
    verdict: str
    layer_distances: dict[int, float]
    thresholds: tuple[float, float]

    def as_dict(self) -> dict:
        return {"score": round(self.score, 4), "verdict": self.verdict, "thresholds": [round(t, 4) for t in self.thresholds],
                "layer_distances": {str(k): round(v, 4) for k, v in self.layer_distances.items()}}


@dataclass
class DomainReference:
    """Feature statistics of one domain as seen by one generator, with thresholds from held-out images."""

    domain: str  # the setting it describes, e.g. "phase_contrast" or "bright_field" for an adapted model
    layers: list[int]
    channels: list[int]  # features per layer (2 x channels of the layer)
    mean: torch.Tensor  # (F,) reference mean of each tile feature
    spread: torch.Tensor  # (F,) its spread (floored, so a near-constant feature cannot dominate)
    directions: torch.Tensor  # (K, F): per layer (its block of columns), the K main directions of in-domain variation
    levels: list[float]  # per layer: median distance of the held-out images, the in-domain level
    thresholds: tuple[float, float]  # (borderline, out of domain) on the score
    held_out_scores: list[float]  # scores of the held-out images the thresholds came from
    input_quantiles: list[float]  # model-unit input values at INPUT_QUANTILES evenly spaced levels
    crop_size: int
    notes: dict = field(default_factory=dict)  # how it was made: crop count, which images were held out and their size
    output_layer: int | None = None  # the prediction's layer, scored beside the encoder; None: a version-1 reference

    @property
    def encoder_layers(self) -> list[int]:
        """The layers a shift of the input enters at: every recorded layer but the output."""
        return [layer for layer in self.layers if layer != self.output_layer]

    # -- scoring --------------------------------------------------------------------------------
    def layer_distances(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """(tiles, F) features of one image -> (layers,) root-mean-square z of its tile-averaged features, with the
        layer's main in-domain directions projected out."""
        averaged = torch.as_tensor(features, dtype=torch.float32).reshape(-1, self.mean.numel()).mean(dim=0)
        z = (averaged - self.mean) / self.spread
        distances = []
        for chunk, directions in zip(torch.split(z, self.channels), torch.split(self.directions, self.channels, dim=1)):
            residual = chunk - (directions @ chunk) @ directions  # natural variation (how many cells, say) projected out
            distances.append(float(residual.pow(2).mean().sqrt()))
        return np.array(distances)

    def score_of_distances(self, distances: np.ndarray) -> float:
        """The score from per-layer distances (see `_score_of_ratios`)."""
        return self._score_of_ratios(np.asarray(distances) / np.asarray(self.levels))

    def _score_of_ratios(self, ratios: np.ndarray) -> float:
        """The encoder's mean ratio of distance to in-domain level, averaged with the output layer's (the input's shift
        and its effect on the stain, weighed equally)."""
        by_layer = dict(zip(self.layers, ratios))
        value = float(np.mean([by_layer[layer] for layer in self.encoder_layers]))
        if self.output_layer is not None:
            value = 0.5 * (value + float(by_layer[self.output_layer]))
        return value

    def score(self, features: torch.Tensor | np.ndarray) -> DomainScore:
        ratios = self.layer_distances(features) / np.asarray(self.levels)
        value = self._score_of_ratios(ratios)
        borderline, out = self.thresholds
        verdict = VERDICTS[0] if value <= borderline else VERDICTS[2] if value > out else VERDICTS[1]
        return DomainScore(value, verdict, {layer: float(r) for layer, r in zip(self.layers, ratios)}, self.thresholds)

    # -- storage: plain tensors and builtins, loadable with weights_only=True --------------------
    def to_dict(self) -> dict:
        return {
            "format": REFERENCE_FORMAT, "version": REFERENCE_VERSION, "domain": self.domain, "layers": list(self.layers),
            "channels": list(self.channels), "mean": self.mean.float().contiguous(), "spread": self.spread.float().contiguous(),
            "directions": self.directions.float().contiguous(),
            "levels": [float(v) for v in self.levels], "thresholds": [float(t) for t in self.thresholds],
            "held_out_scores": [float(v) for v in self.held_out_scores], "input_quantiles": [float(v) for v in self.input_quantiles],
            "crop_size": int(self.crop_size), "notes": dict(self.notes), "output_layer": self.output_layer,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "checkpoint") -> "DomainReference":
        if not isinstance(data, dict) or data.get("format") != REFERENCE_FORMAT:
            raise LmaddaError(f"{where}: its domain reference is damaged; rebuild it with `lmadda diagnose --add-reference`")
        if data.get("version", 0) > REFERENCE_VERSION:
            raise LmaddaError(f"{where}: domain reference version {data['version']}; this lmadda reads up to {REFERENCE_VERSION}: upgrade lmadda")
        try:
            reference = cls(domain=str(data["domain"]), layers=[int(v) for v in data["layers"]], channels=[int(v) for v in data["channels"]],
                            mean=data["mean"].float(), spread=data["spread"].float(), directions=data["directions"].float(),
                            levels=[float(v) for v in data["levels"]],
                            thresholds=(float(data["thresholds"][0]), float(data["thresholds"][1])),
                            held_out_scores=[float(v) for v in data["held_out_scores"]],
                            input_quantiles=[float(v) for v in data["input_quantiles"]], crop_size=int(data["crop_size"]),
                            notes=dict(data.get("notes") or {}),
                            output_layer=None if data.get("output_layer") is None else int(data["output_layer"]))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise LmaddaError(f"{where}: its domain reference is damaged or from another lmadda ({type(error).__name__}: {error}); "
                              "rebuild it with `lmadda diagnose --add-reference`") from error
        if (sum(reference.channels) != reference.mean.numel() or reference.mean.shape != reference.spread.shape
                or reference.directions.ndim != 2 or reference.directions.shape[1] != reference.mean.numel()):
            raise LmaddaError(f"{where}: its domain reference does not fit its own layer sizes; rebuild it with `lmadda diagnose --add-reference`")
        return reference

    def check_fits(self, generator: UNetGenerator, where: str = "checkpoint") -> None:
        if max(self.layers) > generator.last_layer:
            raise LmaddaError(f"{where}: the domain reference names layer {max(self.layers)} but the generator has layers "
                              f"0..{generator.last_layer}; rebuild it with `lmadda diagnose --add-reference`")


# -- building a reference -------------------------------------------------------------------------
def _crops(images: list[np.ndarray], size: int, count: int, seed: int) -> np.ndarray:
    """`count` fixed random crops (N, C, size, size) of (C, H, W) model-unit images (selection.fixed_crops' draw)."""
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        image = images[index % len(images)]
        top = int(rng.integers(0, image.shape[1] - size + 1))
        left = int(rng.integers(0, image.shape[2] - size + 1))
        crops.append(image[:, top:top + size, left:left + size])
    return np.stack(crops).astype(np.float32)


@torch.no_grad()
def crop_features(generator: UNetGenerator, crops: np.ndarray, layers: list[int], batch_size: int = 8,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, F) features of each crop, the generator in eval mode (as predictions run)."""
    was_training = generator.training
    generator.eval()
    rows = []
    for start in range(0, len(crops), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size])).to(device)
        rows.append(forward_with_features(generator, batch, layers)[1].cpu())
    generator.train(was_training)
    return torch.cat(rows)


def build_reference(generator: UNetGenerator, images: list[np.ndarray], held_out: list[np.ndarray] | None = None, *, domain: str,
                    crop_size: int = 256, crops: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> DomainReference:
    """The reference of `generator` on `images` (model-unit inputs, as the generator sees them, corrections applied),
    with thresholds from `held_out` (other images of the same domain; None: the reference images themselves)."""
    if not images:
        raise LmaddaError(f"a domain reference for {domain} needs at least one image")
    multiple = generator.config.multiple
    smallest = min(min(image.shape[1:]) for image in images + (held_out or []))
    size = min(crop_size, smallest) // multiple * multiple
    if size < multiple:
        raise LmaddaError(f"images of {domain} ({smallest} px) are smaller than the model's input multiple {multiple} (2**depth)")
    layers = reference_layers(generator)
    reference_crops = _crops(images, size, crops, seed)
    features = crop_features(generator, reference_crops, layers, device=device)
    if not torch.isfinite(features).all():
        raise LmaddaError(f"the generator's features on {domain} are not finite (a run that diverged): no domain reference can describe them")
    mean, std = features.mean(dim=0), features.std(dim=0, unbiased=False)
    channels = [2 * layer_channels(generator, layer) for layer in layers]
    spread = torch.cat([_floored(chunk) for chunk in torch.split(std, channels)])
    directions = main_directions((features - mean) / spread, channels)
    reference = DomainReference(domain=domain, layers=layers, channels=channels, mean=mean, spread=spread, directions=directions,
                                levels=[1.0] * len(layers),
                                thresholds=(math.inf, math.inf), held_out_scores=[], input_quantiles=[], crop_size=size,
                                output_layer=generator.last_layer)
    # Held-out images are scored exactly as `lmadda predict` scores an image (tiled at the reference's crop size), so
    # the thresholds hold for whole images of about their size.
    held = held_out or images
    held_distances = np.stack([reference.layer_distances(tiled(generator, image, layers, tile=size, device=device)[1]) for image in held])
    reference.levels = [float(max(v, 1e-6)) for v in np.median(held_distances, axis=0)]
    reference.held_out_scores = [reference.score_of_distances(d) for d in held_distances]
    reference.thresholds = thresholds_from(reference.held_out_scores)
    reference.input_quantiles = [float(v) for v in np.quantile(reference_crops, np.linspace(0.0, 1.0, INPUT_QUANTILES))]
    reference.notes = {"reference_crops": int(crops), "held_out_images": len(held),
                       "held_out_size": [int(v) for v in held[0].shape[1:]],
                       "held_out": "held-out images" if held_out else "the reference images themselves (no held-out images given)"}
    return reference


def main_directions(z: torch.Tensor, channels: list[int], count: int | None = None) -> torch.Tensor:
    """(K, F): for each layer's block of columns, the top K principal directions of the reference crops' z-scores.

    Between fields of one domain, features move together along a few directions (more or fewer cells,
    denser or sparser): on the simulated data, two directions held most of that, and projecting them out
    narrowed the spread of held-out in-domain scores enough for thresholds to separate shifted images
    (docs/domain_check.md). A shift moves features in other directions too, and those are what remain.
    """
    count = min(PRINCIPAL_DIRECTIONS if count is None else count, max(len(z) - 1, 0))
    blocks = []
    for chunk in torch.split(z, channels, dim=1):
        _, _, vt = torch.linalg.svd(chunk - chunk.mean(dim=0), full_matrices=False)
        block = torch.zeros(PRINCIPAL_DIRECTIONS, chunk.shape[1])
        block[:count] = vt[:count]
        blocks.append(block)
    return torch.cat(blocks, dim=1)


def _floored(std: torch.Tensor) -> torch.Tensor:
    """A feature almost constant over the reference crops would turn any change into a huge z: floor its spread at a
    tenth of its layer's median spread."""
    return torch.clamp(std, min=float(0.1 * std.median()) + 1e-6)


def thresholds_from(held_out_scores: list[float]) -> tuple[float, float]:
    """(borderline, out of domain) from held-out in-domain scores: BORDERLINE_Z and OUT_Z robust standard deviations
    (1.4826 x the median absolute deviation) above their median, on the log scale. Robust, because a held-out set of a
    few images often holds one odd field (nearly empty, say) that would otherwise widen both thresholds."""
    logs = np.log(np.maximum(np.asarray(held_out_scores, dtype=np.float64), 1e-6))
    if logs.size == 0:
        raise LmaddaError("no held-out scores to set the domain thresholds from")
    centre = float(np.median(logs))
    # floor: a handful of similar held-out images would otherwise put the borderline a few per cent above their median
    spread = max(1.4826 * float(np.median(np.abs(logs - centre))), SPREAD_FLOOR)
    return math.exp(centre + BORDERLINE_Z * spread), math.exp(centre + OUT_Z * spread)


def reference_from_images(generator: UNetGenerator, images: list, held_out: list | None = None, *, domain: str,
                          transform: Transform | None = None, device: torch.device | str = "cpu") -> DomainReference:
    """`build_reference` from `LoadedImage`s (their normalised inputs), with the model's input correction if it has one."""
    def inputs(loaded: list) -> list[np.ndarray]:
        return [loaded_image.input if transform is None else transform(loaded_image.input) for loaded_image in loaded]

    return build_reference(generator, inputs(images), inputs(held_out) if held_out else None, domain=domain, device=device)


# -- scoring whole images -------------------------------------------------------------------------
class RecordingForward:
    """The generator's forward for a tiling loop (`predict_tiled(forward=...)`), keeping each tile's features at `layers`
    from that same pass, in the order the tiles went through."""

    def __init__(self, generator: UNetGenerator, layers: list[int]):
        self.generator, self.layers, self.rows = generator, layers, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        output, features = forward_with_features(self.generator, batch, self.layers)
        self.rows.append(features.cpu())
        return output

    def features(self) -> torch.Tensor:
        """(tiles, F): every tile's features so far."""
        return torch.cat(self.rows)


@torch.no_grad()
def tiled(generator: UNetGenerator, image: np.ndarray, layers: list[int], *, tile: int = 256, overlap: float = 0.25,
          batch_size: int = 8, device: torch.device | str | None = None, progress: str | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """`predict_tiled` that also keeps each tile's features: the same tiles, the same forward; (prediction, (tiles, F))."""
    forward = RecordingForward(generator, layers)
    prediction = predict_tiled(generator, image, tile=tile, overlap=overlap, batch_size=batch_size, device=device,
                               progress=progress, forward=forward)
    return prediction, forward.features()


def fitting_tile(shape: tuple[int, ...], multiple: int, largest: int = 256) -> int:
    """The domain check's tile for an image of (..., H, W) `shape`: no larger than the image, since a padded tile is
    part mirror image, which the check rightly finds odd; a multiple of the model's 2**depth."""
    return max(multiple, min(largest, *shape[-2:]) // multiple * multiple)


def predict_and_score(generator: UNetGenerator, reference: DomainReference, image: np.ndarray, *, tile: int = 256,
                      overlap: float = 0.25, batch_size: int = 8, device: torch.device | str | None = None,
                      progress: str | None = None) -> tuple[np.ndarray, DomainScore]:
    """The prediction of a (C, H, W) model-unit image, as `predict_tiled` makes it, and its domain score."""
    prediction, features = tiled(generator, image, reference.layers, tile=tile, overlap=overlap, batch_size=batch_size, device=device,
                                 progress=progress)
    return prediction, reference.score(features)


@torch.no_grad()
def forward_scored(checkpoint, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """The endpoint's forward of a batch of tiles: the predictions and, when the checkpoint carries a domain
    reference, each tile's features from the same pass (rows follow the tiles, so a micro-batch of several
    requests' tiles splits back per request)."""
    reference = checkpoint.domain_reference
    if reference is None:
        return checkpoint.generator(x).float().cpu().numpy(), None
    output, features = forward_with_features(checkpoint.generator, x, reference.layers)
    return output.float().cpu().numpy(), features.cpu().numpy()


def score_tiles(checkpoint, features: list[np.ndarray | None]) -> DomainScore | None:
    """The domain score of one image from its tiles' features (`forward_scored`); None without a reference."""
    if checkpoint.domain_reference is None or not features or any(f is None for f in features):
        return None
    return checkpoint.domain_reference.score(np.concatenate(features))
