"""`lmadda adapt --layer auto`: adapt at several layers, then let the label-free selector pick the model.

The candidates are every family lmadda has, so the one selector sees them all:

- needing no training: the unadapted source model, AdaBN (all layers, and layers 0..l only),
  histogram matching, histogram matching followed by AdaBN, and the zoom that undoes another
  objective's scale (lmadda.corrections.zoom), when the domain check finds one;
- trained: LM-ADDA at each of `auto_layers` (the last is ADDA), and, at the early encoder cut
  (`family_layers`), moment matching, self-training and histogram matching + self-training.

`lmadda.selection.selector` scores them on unlabelled target crops and keeps the unadapted model unless one is
confidently better. Whatever it picks is written as one checkpoint
a lab can use as it is: an adapted generator, AdaBN's generator, or the source generator carrying the
histogram-matching correction (applied by `lmadda predict` and the endpoint). The checkpoint records
the choice, its reason and every candidate's score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lmadda.corrections.baselines import build_baseline
from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.data.correction import HistogramMatcher
from lmadda.data.dataset import LoadedImage
from lmadda.domain import reference_from_images
from lmadda.evaluation.rows import adda_or_lmadda
from lmadda.selection.selector import UNADAPTED, ZOOM, Candidate, Choice, Selector
from lmadda.training.adapt import AdaptConfig, adapt, run_steps
from lmadda.training.families import FAMILIES, FamilyConfig, check_family, family_config, make_loop

CHEAP_CANDIDATES = ("adabn", "histogram_matching")  # what a checkpoint can carry; FDA needs source images at run time


def family_layers(num_layers: int) -> list[int]:
    """Where the families without an adversary cut: layer 3, the early encoder where contrast and exposure enter
    (the paper's finding for intensity shifts), or the bottleneck of a shallower generator."""
    return [min(3, num_layers // 2 - 1)]


def cheap_candidate_names(num_layers: int) -> list[str]:
    """The corrections that need no training: AdaBN and histogram matching, AdaBN limited to the early cut, both
    AdaBNs after histogram matching (composites), and the zoom the domain check finds (lmadda.corrections.zoom)."""
    cut = family_layers(num_layers)[0]
    names = [*CHEAP_CANDIDATES, "histogram_matching+adabn", ZOOM]
    if cut >= 1:  # layer 0 has no BatchNorm
        names += [f"adabn:{cut}", f"histogram_matching+adabn:{cut}"]
    return names


def auto_layers(num_layers: int) -> list[int]:
    """The first encoder layers (where contrast and exposure shifts enter), the bottleneck, a decoder layer and the last (ADDA)."""
    depth = num_layers // 2
    return sorted({layer for layer in (0, 1, 2, 3, depth - 1, depth + depth // 2 - 1, num_layers - 1) if 0 <= layer < num_layers})


def baseline_candidates(source: GeneratorCheckpoint, source_images: list[LoadedImage], target_images: list[LoadedImage], *,
                        seed: int = 0) -> list[Candidate]:
    """The candidates that need no adaptation: the unadapted model ("don't adapt") and each cheap correction."""
    candidates = [Candidate(UNADAPTED, source.generator)]
    for name in cheap_candidate_names(source.generator.num_layers):
        generator, transform = build_baseline(name, source.generator, source_images, target_images, seed=seed)
        if generator is source.generator and transform is None:  # a zoom of 1: the unadapted model again, no second vote
            continue
        candidates.append(Candidate(name, generator, transform, family=name.split(":")[0]))
    return candidates


def checkpoint_for(source: GeneratorCheckpoint, choice: Choice, candidates: list[Candidate], target_setting: str,
                   adapted: GeneratorCheckpoint | None = None, *, target_images: list[LoadedImage] | None = None) -> GeneratorCheckpoint:
    """The chosen model as a checkpoint: an adapted one as it is, or one made for the unadapted model or a cheap
    correction (carrying the chosen candidate's own histogram-matching correction).

    Its domain reference (lmadda.domain): the unadapted model keeps the source's, as nothing about it
    changed; a cheap correction gets one of `target_images` as the corrected model sees them (every
    fourth held out for the thresholds), as an adapted model does."""
    if adapted is None:
        candidate = next(c for c in candidates if c.name == choice.chosen)
        metadata = {**{k: v for k, v in source.metadata.items() if k != "history"}, "method": choice.chosen}
        if isinstance(candidate.input_transform, HistogramMatcher):
            metadata["input_correction"] = candidate.input_transform.as_correction()
        reference = source.domain_reference
        if candidate.name != UNADAPTED and target_images:
            held_out = target_images[::4] if len(target_images) >= 4 else None
            rest = [image for index, image in enumerate(target_images) if held_out is None or index % 4]
            reference = reference_from_images(candidate.generator, rest, held_out, domain=target_setting, transform=candidate.input_transform)
        adapted = GeneratorCheckpoint(generator=candidate.generator, markers=source.markers, setting=target_setting, percentiles=source.percentiles,
                                      target_norm=source.target_norm, target_dtype=source.target_dtype, metadata=metadata,
                                      domain_reference=reference)
    adapted.metadata["label_free_choice"] = choice.as_dict()
    return adapted


@dataclass
class AutoResult:
    checkpoint: GeneratorCheckpoint
    choice: Choice
    adapted: dict[str, object]  # candidate name -> AdaptResult of each adaptation
    candidates: list[Candidate] = field(default_factory=list)  # every candidate the selector saw
    checkpoints: dict[str, GeneratorCheckpoint] = field(default_factory=dict)  # each trained, uncollapsed candidate's checkpoint


def family_runs(source: GeneratorCheckpoint, config: AdaptConfig, layers: list[int], families: tuple[str, ...]) -> list[tuple[str, FamilyConfig]]:
    """(candidate name, config) of every trained candidate: LM-ADDA at each of `layers`, the other families at the early
    cut, each with the LM-ADDA config's step budget, batch, crop, seed and device (lmadda.training.families)."""
    last, runs = source.generator.last_layer, []
    if "lmadda" in families:
        runs += [(f"{adda_or_lmadda([layer], last)}:{layer}", config.model_copy(update={"layer": [layer]})) for layer in layers]
    shared = config.model_dump(exclude={"layer", "seed", "lr", "recipe", "adversary"})
    for layer in family_layers(source.generator.num_layers):
        runs += [(f"{family}:{layer}", family_config(family, shared, layer, config.seed)) for family in families if family != "lmadda"]
    return runs


def adapt_and_choose(source: GeneratorCheckpoint, source_images: list[LoadedImage], target_images: list[LoadedImage],
                     config: AdaptConfig, target_setting: str, *, layers: list[int] | None = None, selector_options: dict | None = None,
                     families: tuple[str, ...] = FAMILIES, progress: bool = True, log: Callable[[str], None] = print) -> AutoResult:
    for family in families:
        check_family(family)
    layers = layers or auto_layers(source.generator.num_layers)
    candidates = baseline_candidates(source, source_images, target_images, seed=config.seed)
    adapted, checkpoints = {}, {}
    for name, run_config in family_runs(source, config, layers, families):
        if isinstance(run_config, AdaptConfig):
            result = adapt(source, source_images, target_images, run_config, progress=progress)
        else:
            loop = make_loop(run_config, source, source_images, target_images)
            run_steps(loop)
            result = loop.finish()
        log(f"[auto] {name}: {result.steps_done} steps, G' updated at {result.g_updates}" + (" COLLAPSED" if result.collapsed else ""))
        adapted[name] = result
        if not result.collapsed:  # a collapsed run is never a candidate
            candidates.append(Candidate(name, result.generator, result.input_correction, family=name.split(":")[0]))
            checkpoints[name] = result.checkpoint(source, run_config, target_setting)
    selector = Selector(source.generator, source_images, target_images, seed=config.seed, domain_reference=source.domain_reference,
                        **(selector_options or {}))
    choice = selector.choose(candidates)
    checkpoint = checkpoint_for(source, choice, candidates, target_setting, checkpoints.get(choice.chosen), target_images=target_images)
    return AutoResult(checkpoint, choice, adapted, candidates, checkpoints)
