"""The label-free choice: which model should a lab use for a new setting, adapted or not?

The candidates are every model lmadda can give a lab for the setting: the unadapted source model,
the cheap corrections (AdaBN, histogram matching, FDA) and the adapted generators (LM-ADDA at its
layers, ADDA). None of them may be judged by target labels, since a lab has none. The selector
scores each candidate on fixed crops of the unlabelled target images, per crop, and

1. takes the candidate with the best (lowest) mean score;
2. keeps it only if it is *confidently* better than the default model: better on at least
   `min_win_fraction` of the crops and by at least `min_gain` of the default model's score;
   otherwise it falls back to the default ("don't adapt") and says why. The default is the unadapted
   model, or a robust source model where the study or the demo admitted one (it needs no target).

Geometry first: a `zoom` candidate exists only when the source model's domain check found the target at
another scale (resampling removed at least a quarter of its score, lmadda.corrections.zoom). When its stains then
look like source stains (its mean score at or below the source's own level) and beat the unadapted
model's on `min_win_fraction` of the crops, it is chosen before anything else: below the source's
level a lower score says nothing more (a candidate cannot look more like the source than the source
does), so the score cannot rank it against candidates that also got there, and the zoom is the one
with independent evidence of what the shift was.

The scores (all lower is better, all label-free; docs/method.md has how each was measured against
labelled Pearson and why the default was chosen):

- `consensus`: distance of a candidate's prediction to the pixel-wise median of the predictions of
  the candidate *families* (unadapted, each correction, the adapted models). Errors that a domain
  shift causes differ between methods that correct it in different places; the stain itself is what
  they share (the ensemble-agreement idea of SIT-ADDA-Auto, across methods rather than seeds).
- `output_w1`: the W1 distance between a candidate's predicted stain intensities on a target crop
  and its base model's predictions on source crops (a good model predicts stains that look like
  its own stains in domain). The base is the source model a candidate was built from: the unadapted
  one, or a robust source model (`references`), whose stains differ a little from the plain model's
  in domain too, so that judged against the plain model's they look shifted where nothing is. A zoom
  candidate (`input_zoom` z, lmadda.corrections.zoom) predicts a stain at the target's scale, so its stains are
  compared with the source's seen at that scale (resampled by 1/z): like with like.
- `feature_gap`: how far a target crop's bottleneck channel means sit from the base model's on source
  crops, in units of their spread (leftover domain shift where every input has been summarised).
- `flip`: how much the prediction changes when the crop is mirrored (no preferred orientation).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lmadda.core.atomic import write_atomically
from lmadda.data.correction import InputTransform
from lmadda.data.dataset import LoadedImage, spread, target_from_model_range
from lmadda.domain import DomainReference
from lmadda.models.generator import UNetGenerator
from lmadda.selection.criteria import CRITERIA, channel_spread, feature_gap, fixed_crops, flip_difference, wasserstein_1d

SCORES = ("consensus", "output_w1", "feature_gap", "flip")
# `lmadda sweep promote --criterion`: labelled Pearson, this selector, or one per-trial criterion (for comparison)
PROMOTION_CRITERIA = ("auto", "pearson", "label_free", *(f"lf_{name}" for name in CRITERIA))
DEFAULT_SCORE = "output_w1"
UNADAPTED = "unadapted"
ZOOM = "zoom"  # the zoom correction (lmadda.corrections.zoom): a candidate only when the domain check found the target at another scale


@dataclass(frozen=True)
class Candidate:
    """One model a lab could use: a generator, and the input correction applied before it (if any)."""

    name: str  # unique, e.g. "unadapted", "histogram_matching", "lmadda:3"
    generator: UNetGenerator
    input_transform: InputTransform | None = None
    family: str = ""  # candidates of one family share one vote in the consensus (default: the name before ':')
    base: str = UNADAPTED  # the source model it was built from: its in-domain stains are the candidate's reference

    @property
    def family_name(self) -> str:
        return self.family or self.name.split(":")[0]


@dataclass
class Choice:
    """The selector's answer, with the evidence a lab can read."""

    chosen: str
    fell_back: bool
    reason: str
    score: str
    means: dict[str, float] = field(default_factory=dict)  # mean score per candidate
    win_fraction: dict[str, float] = field(default_factory=dict)  # fraction of crops where it beats the default model

    def as_dict(self) -> dict:
        return {"chosen": self.chosen, "fell_back": self.fell_back, "reason": self.reason, "score": self.score,
                "means": self.means, "win_fraction": self.win_fraction}


@dataclass
class Observation:
    """What the selector needs of one candidate: its outputs on the fixed target crops.

    Small enough to keep on disk (float16), so a study that resumes can still choose among models it
    adapted in an earlier run.
    """

    family: str
    predicted: np.ndarray  # (N, C, H, W) predictions in 0..1 target units
    mirrored: np.ndarray  # predictions of the mirrored crops, mirrored back
    means: np.ndarray  # (N, channels) bottleneck channel means
    zoom: float = 1.0  # the candidate's input_zoom: the scale its stains are at, relative to the source's
    base: str = UNADAPTED  # the source model it was built from (`Candidate.base`)

    def save(self, path: Path) -> Path:
        def write(temporary: Path) -> None:
            with temporary.open("wb") as file:  # a file object: np.savez would append .npz to a path
                np.savez(file, family=np.array(self.family), predicted=self.predicted.astype(np.float16),
                         mirrored=self.mirrored.astype(np.float16), means=self.means.astype(np.float32), zoom=np.array(self.zoom),
                         base=np.array(self.base))

        return write_atomically(path, write)

    @classmethod
    def load(cls, path: Path) -> "Observation":
        with np.load(path) as data:
            zoom = float(data["zoom"]) if "zoom" in data.files else 1.0  # observations kept before zoom existed
            base = str(data["base"]) if "base" in data.files else UNADAPTED  # observations kept before bases existed
            return cls(str(data["family"]), data["predicted"].astype(np.float32), data["mirrored"].astype(np.float32),
                       data["means"].astype(np.float32), zoom, base)


@torch.no_grad()
def _run(generator: UNetGenerator, crops: np.ndarray, transform: InputTransform | None, bottleneck: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions (0..1 target units), bottleneck channel means and mirrored predictions of the crops."""
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    inputs = np.stack([transform(c) for c in crops]) if transform is not None else crops
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)).to(device)
    predicted = target_from_model_range(generator(x).float().cpu().numpy())
    means = generator.forward_to(bottleneck, x).activation.mean(dim=(2, 3)).float().cpu().numpy()
    mirrored = target_from_model_range(generator(torch.flip(x, dims=[-1])).float().cpu().numpy())[..., ::-1]
    generator.train(was_training)
    return predicted, means, np.ascontiguousarray(mirrored)


@dataclass(frozen=True)
class Reference:
    """What one source model's outputs look like in its own domain, on the selector's fixed source crops: the level
    the candidates built from it are measured against."""

    pool: np.ndarray  # (N, C, H, W) its stains on source crops
    mean: np.ndarray  # its bottleneck channel means on source crops, and their spread
    spread: np.ndarray
    floor: dict[str, np.ndarray]  # the model itself on other source crops, scored like a candidate: the in-domain level


class Selector:
    """Fixed crops of source and unlabelled target images; `per_crop(candidates)` and `choose(candidates)`.

    `references` names the other source models candidates may be built from (`Candidate.base`), such as an admitted
    robust source model; the unadapted `source` is always one."""

    def __init__(self, source: UNetGenerator, source_images: list[LoadedImage], target_images: list[LoadedImage], *,
                 crop_size: int = 128, crops: int = 16, seed: int = 0, score: str = DEFAULT_SCORE,
                 min_win_fraction: float = 0.75, min_gain: float = 0.25, guard: str | None = None,
                 domain_reference: DomainReference | None = None, references: dict[str, UNetGenerator] | None = None):
        if score not in SCORES or guard not in (None, *SCORES):
            raise ValueError(f"unknown selection score {score!r} or guard {guard!r}; known: {', '.join(SCORES)}")
        if not source_images or not target_images:
            raise ValueError("the selector needs source images and unlabelled target images")
        multiple = source.config.multiple
        smallest = min(s for image in source_images + target_images for s in image.input.shape[1:])
        if smallest < multiple:
            raise ValueError(f"images ({smallest} px) are smaller than the model's input multiple {multiple} (2**depth)")
        size = min(max(crop_size, multiple), smallest) // multiple * multiple  # crops are multiples of 2**depth
        self.score, self.min_win_fraction, self.min_gain, self.guard = score, min_win_fraction, min_gain, guard
        self.source, self.target_images, self.domain_reference = source, target_images, domain_reference
        self._out_of_domain: float | None = None
        self._pools: dict[tuple[str, float], np.ndarray] = {}
        self.bottleneck = source.config.depth - 1
        self.target_crops = fixed_crops(target_images, size, crops, seed + 1)
        self._models = {UNADAPTED: source, **(references or {})}
        self._source_crops = fixed_crops(source_images, size, crops, seed)
        self._held_out_crops = fixed_crops(source_images, size, crops, seed + 2)
        self._references: dict[str, Reference] = {}

    def reference(self, base: str = UNADAPTED) -> Reference:
        """The in-domain level of the source model `base` (computed once)."""
        if base not in self._models:
            raise ValueError(f"a candidate is built from {base!r}, which the selector was not given: pass it in `references`")
        if base not in self._references:
            model = self._models[base]
            predicted, means, _ = _run(model, self._source_crops, None, self.bottleneck)
            unscored = Reference(predicted, means.mean(axis=0), channel_spread(means), floor={})
            # The floor: the model on other source crops, scored like a candidate. A target whose default model scores
            # within this is already in domain; a gain is measured against the excess over it.
            held_out = _run(model, self._held_out_crops, None, self.bottleneck)
            floor = self._scores(Observation("source", held_out[0], held_out[2], held_out[1], base=base), None, unscored)
            self._references[base] = replace(unscored, floor=floor)
        return self._references[base]

    @property
    def source_pool(self) -> np.ndarray:
        """The unadapted source model's stains on the source crops: what stains look like in the source domain."""
        return self.reference().pool

    @property
    def floor(self) -> dict[str, np.ndarray]:
        """The unadapted source model's in-domain level per score and crop."""
        return self.reference().floor

    def observe(self, candidate: Candidate) -> Observation:
        predicted, means, mirrored = _run(candidate.generator, self.target_crops, candidate.input_transform, self.bottleneck)
        return Observation(candidate.family_name, predicted, mirrored, means, candidate.generator.config.input_zoom, candidate.base)

    def _pool_at(self, reference: Reference, base: str, zoom: float) -> np.ndarray:
        """A base model's source stains as they look at a target's scale: resampled by 1/`zoom` (cached per zoom)."""
        if zoom == 1.0:
            return reference.pool
        if (base, zoom) not in self._pools:
            from lmadda.corrections.zoom import resample

            self._pools[(base, zoom)] = np.stack([resample(stain, 1.0 / zoom) for stain in reference.pool])
        return self._pools[(base, zoom)]

    def _scores(self, observation: Observation, consensus: np.ndarray | None,
                reference: Reference | None = None) -> dict[str, np.ndarray]:
        predicted, means, mirrored = observation.predicted, observation.means, observation.mirrored
        reference = reference or self.reference(observation.base)
        pool = self._pool_at(reference, observation.base, observation.zoom)
        channels = pool.shape[1]
        return {
            "consensus": np.abs(predicted - consensus).mean(axis=(1, 2, 3)) if consensus is not None else np.zeros(len(predicted)),
            "output_w1": np.array([np.mean([wasserstein_1d(p[ch], pool[:, ch], quantiles=128) for ch in range(channels)])
                                   for p in predicted]),
            "feature_gap": feature_gap(means, reference.mean, reference.spread),
            "flip": flip_difference(predicted, mirrored),
        }

    def observe_all(self, candidates: list[Candidate] | dict[str, Observation]) -> dict[str, Observation]:
        """name -> observation (observations pass through)."""
        if isinstance(candidates, dict):
            return candidates
        names = [c.name for c in candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be unique, got {names}")
        return {c.name: self.observe(c) for c in candidates}

    def per_crop(self, candidates: list[Candidate] | dict[str, Observation]) -> dict[str, dict[str, np.ndarray]]:
        """score name -> candidate name -> per-crop values (lower is better), each against its base model's reference."""
        observations = self.observe_all(candidates)
        families: dict[str, list[np.ndarray]] = {}
        for observation in observations.values():
            families.setdefault(observation.family, []).append(observation.predicted)
        # one vote per family: its own median, so twelve adapted layers do not outvote one correction
        votes = np.stack([np.median(np.stack(members), axis=0) for members in families.values()])
        consensus = np.median(votes, axis=0)
        result: dict[str, dict[str, np.ndarray]] = {score: {} for score in SCORES}
        for name, observation in observations.items():
            for score, values in self._scores(observation, consensus).items():
                result[score][name] = values
        return result

    def out_of_domain(self) -> float:
        """The fraction of the target images (8 at most) that the source model's domain check does not call in domain;
        0 without a domain reference. Features see shifts that leave the stain's intensities alone (a zoom)."""
        if self.domain_reference is None:
            return 0.0
        if self._out_of_domain is None:
            from lmadda.domain import fitting_tile, predict_and_score

            images = spread(self.target_images, 8)
            multiple = self.source.config.multiple
            verdicts = [predict_and_score(self.source, self.domain_reference, image.input,
                                          tile=fitting_tile(image.input.shape, multiple))[1].verdict for image in images]
            self._out_of_domain = float(np.mean([verdict != "in_domain" for verdict in verdicts]))
        return self._out_of_domain

    def choose(self, candidates: list[Candidate] | dict[str, Observation], default: str = UNADAPTED) -> Choice:
        """The choice among `candidates`, keeping `default` (the unadapted model, or an admitted robust source model)
        unless one is confidently better (`decide`). The in-domain level is the default's base model's."""
        if UNADAPTED not in (candidates if isinstance(candidates, dict) else [c.name for c in candidates]):
            raise ValueError("the candidates must include the unadapted model: 'don't adapt' is always an answer")
        observations = self.observe_all(candidates)
        if default not in observations:
            raise ValueError(f"the default model {default!r} is not among the candidates: 'don't adapt' is always an answer")
        # the in-domain level is the default's own base's (consensus has none); the zoom's is the unadapted model's
        floor = None if self.score == "consensus" else self.reference(observations[default].base).floor[self.score]
        unadapted_floor = None if floor is None else self.floor[self.score]
        scores = self.per_crop(observations)
        return decide(scores[self.score], self.score, floor=floor, guard=scores[self.guard] if self.guard else None,
                      min_win_fraction=self.min_win_fraction, min_gain=self.min_gain,
                      out_of_domain=self.out_of_domain() if floor is not None else 0.0, default=default,
                      unadapted_floor=unadapted_floor)


def decide(per_crop: dict[str, np.ndarray], score: str, *, floor: np.ndarray | None = None, guard: dict[str, np.ndarray] | None = None,
           min_win_fraction: float = 0.75, min_gain: float = 0.25, out_of_domain: float = 0.0, default: str = UNADAPTED,
           unadapted_floor: np.ndarray | None = None) -> Choice:
    """The best candidate by mean score, kept only when it is confidently better than the `default` model.

    `default`: what a lab uses without adapting, kept unless a candidate is confidently better: the unadapted source
    model, or a robust source model admitted as the anchor (`lmadda.training.robust`), which needs no target.
    `floor`: the score of the default's base model on held-out source crops, the in-domain level. With it, the
    target must look shifted (the default model above the floor's median on `min_win_fraction` of the
    crops) and the gain is the fraction of the excess over the floor that the candidate removes;
    without it, the fraction of the default model's score. Either way the gain must reach `min_gain`
    and the candidate must beat the default model on `min_win_fraction` of the crops.
    `guard` (per-crop consensus distances): a second, independent signal that must not object. A
    candidate farther from the other methods' consensus than the default model on most crops is
    passed over for the next best, however source-like it looks.
    `out_of_domain`: the fraction of target images the source's domain check (encoder features) does not
    call in domain. When most are out of domain but `score` sees no shift (a zoom leaves the stain's
    intensities alone), the target is not called "nothing to adapt to": candidates are judged against
    the default model's own score, as without a floor.
    `unadapted_floor`: the unadapted model's in-domain level, where the default is built from another model (a
    robust default's floor is its own); the zoom, the unadapted model resampled, is checked against it.
    """
    if default not in per_crop:
        raise ValueError(f"the default model {default!r} is not among the candidates: 'don't adapt' is always an answer")
    label = "the unadapted model" if default == UNADAPTED else f"the {default} model"
    means = {name: float(np.mean(values)) for name, values in per_crop.items()}
    base = per_crop[default]
    wins = {name: float(np.mean(values < base)) for name, values in per_crop.items()}
    note = ""
    # Geometry first, whatever the default: the zoom is checked against the model it resamples (the unadapted one). A
    # robust default whose augmentation covers some of the scale also sits near the source's level, where the score
    # cannot rank the two (below), and the zoom is the one with independent evidence of what the shift was.
    zoom_wins = float(np.mean(per_crop[ZOOM] < per_crop[UNADAPTED])) if ZOOM in means and UNADAPTED in per_crop else 0.0
    zoom_floor = unadapted_floor if unadapted_floor is not None else floor
    if ZOOM in means and zoom_floor is not None and means[ZOOM] <= float(np.mean(zoom_floor)) and zoom_wins >= min_win_fraction:
        return Choice(ZOOM, False, f"the domain check found the target at another scale, and the zoomed model's stains sit at the "
                                   f"source's own level in {score} and beat the unadapted model's on {zoom_wins:.0%} of the "
                                   "target crops: geometry first", score, means, wins)
    if floor is not None:
        shifted = float(np.mean(base > np.median(floor)))
        if shifted < min_win_fraction and out_of_domain <= 0.5:
            return Choice(default, True, f"the target looks like the source domain: {label}'s {score} exceeds the "
                                         f"source's own level on only {shifted:.0%} of the target crops; nothing to adapt to",
                          score, means, wins)
        if shifted < min_win_fraction:  # the features see a shift the score does not: judge against the default model itself
            floor = None
            note = (f" ({score} sees no shift, but the domain check calls {out_of_domain:.0%} of the target images out of "
                    f"domain, so gains are measured against {label}'s own score)")
    excess = max(means[default] - (float(np.mean(floor)) if floor is not None else 0.0), 1e-12)
    unit = f"of {label}'s excess over the source level" if floor is not None else f"of {label}'s score"
    refusals = []
    for name in sorted((n for n in means if means[n] < means[default]), key=means.get):
        gain = (means[default] - means[name]) / excess
        closer = float(np.mean(guard[name] < guard[default])) if guard is not None else 1.0  # crops where it agrees better
        if wins[name] < min_win_fraction:
            refusals.append(f"{name} is better on only {wins[name]:.0%} of the target crops (needs {min_win_fraction:.0%})")
        elif gain < min_gain:
            refusals.append(f"{name} removes only {gain:.0%} {unit} (needs {min_gain:.0%})")
        elif closer < 0.5:
            refusals.append(f"{name} looks source-like but sits farther from the other methods' consensus than {label} "
                            f"on {1 - closer:.0%} of the crops")
        else:
            passed = "; passed over: " + "; ".join(refusals) if refusals else ""
            return Choice(name, False, f"{name} removes {min(gain, 9.99):.0%} {unit} in {score} and beats {label} on "
                                       f"{wins[name]:.0%} of the target crops{passed}{note}", score, means, wins)
        if guard is None:
            break  # without a second signal only the best candidate is considered
    if not refusals:
        return Choice(default, True, f"no candidate scores better than {label} on {score}{note}", score, means, wins)
    return Choice(default, True, "; ".join(refusals[:3]) + f": not confidently better, keep {label}{note}", score, means, wins)
