"""The demo study on the embedded simulated data (what `make demo` runs).

simulate data -> train a small source model (phase contrast -> DAPI and CD29-like) -> evaluate it
unadapted on bright field and on overexposed phase contrast -> a robust source model fine-tuned with
imaging-nuisance augmentation -> baselines and composites -> LM-ADDA at a few layers including the
last (ADDA) and moment matching at the early cut ->
the label-free choice among all of them -> table, plots and a sample panel of the chosen model. Every
stage reuses what an earlier run left in the output folder, so an interrupted demo resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lmadda.corrections.baselines import build_baseline, is_baseline
from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint
from lmadda.core.errors import LmaddaError
from lmadda.data.augment import NuisanceAugmentation
from lmadda.data.contact_sheet import contact_sheet
from lmadda.data.correction import input_correction
from lmadda.data.dataset import load_images, target_from_model_range
from lmadda.data.io import read_image, write_tiff
from lmadda.data.manifest import Manifest
from lmadda.data.shifts import Shift
from lmadda.data.synth import SynthConfig, synthesize
from lmadda.domain import fitting_tile, predict_and_score
from lmadda.evaluation.evaluate import SPLIT_SEED_OFFSET
from lmadda.core.registry_names import alias_for
from lmadda.study.report import choice_lines, summary_table, write_report
from lmadda.evaluation.rows import TargetDomain
from lmadda.study.config import Grid, SelectionSpec
from lmadda.study.figures import panel_file_name, stain_panel
from lmadda.study.grid import ROBUST_VARIANTS, check_robust_rows, model_file_name, run_grid
from lmadda.models.tiling import predict_tiled
from lmadda.training.robust import ROBUST_FILES, robust_with_second_try, second_try
from lmadda.training.source import SourceTrainConfig, changed_options, train_source


SERVED_SHIFT = "overexposure:2.5"  # the demo target `lmadda serve --demo` stains through HTTP


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Path("demo-out")
    fields: int = Field(64, ge=12)
    size: int = 256
    seed: int = 0
    markers: list[str] = Field(default_factory=lambda: ["dapi", "cd29"])
    source_epochs: int = Field(12, ge=1)
    crops_per_epoch: int = Field(160, ge=4)
    # overexposure x1.5 costs this model nothing; the Ray Tune sweep of `make demo` covers the magnitudes
    targets: list[str] = Field(default_factory=lambda: ["bright_field", f"phase_contrast+{SERVED_SHIFT}"])
    # an early, a middle and the last layer (ADDA): the study (docs/study.md) covers the rest within its budget
    layers: list[int] = Field(default_factory=lambda: [0, 3, 15])
    adapt_steps: int = Field(150, ge=1)
    adapt_lr: float = Field(2e-5, gt=0)
    # the other families at the early cut, and the corrections that need no training (lmadda.training.families);
    # self-training is left out here: it cost 6x LM-ADDA's time per step and gained nothing on validation fields (docs/method.md)
    families: list[str] = Field(default_factory=lambda: ["lmadda", "moments"])
    family_layers: list[int] = Field(default_factory=lambda: [3])
    baselines: list[str] = Field(default_factory=lambda: ["adabn", "histogram_matching", "fda", "adabn:3", "histogram_matching+adabn:3"])
    robust_epochs: int = Field(6, ge=0, description="fine-tune a robust source model with imaging-nuisance augmentation for this "
                                                    "many epochs, a candidate of the choice (0: none)")
    paper: bool = Field(False, description="also adapt with ADDA as published (one Adam setting, no gate; the study always runs it)")
    oracle: bool = Field(False, description="also train an oracle on target pairs for each target (costs one source training each)")


def run_demo(config: DemoConfig, log=print) -> Path:
    start = time.perf_counter()
    out = config.out
    data_dir = out / "data"
    manifest_path = data_dir / "manifest.parquet"
    if manifest_path.exists():
        manifest = Manifest.load(manifest_path)
        log(f"[demo] reusing simulated data in {data_dir}")
    else:
        manifest, seconds = synthesize(data_dir, SynthConfig(fields=config.fields, size=config.size, seed=config.seed))
        log(f"[demo] simulated {len(manifest.fields())} fields in {seconds:.1f} s -> {data_dir}")
    log(manifest.summary(with_images=False))
    log(f"[demo] contact sheet: {contact_sheet(manifest, out / 'contact_sheet.png')}")

    source_config = SourceTrainConfig(manifest=manifest_path.resolve(), setting="phase_contrast", markers=config.markers,
                                      epochs=config.source_epochs, crops_per_epoch=config.crops_per_epoch, seed=config.seed)
    source_path = out / "models" / "source_phase_contrast.pt"
    if source_path.exists():
        _check_reusable(source_path, source_config, out)
        log(f"[demo] reusing source model {source_path}")
    else:
        result = train_source(source_config, source_path)
        log(f"[demo] source model: best validation Pearson {result.best_val_pearson:.3f} ({result.seconds:.0f} s) -> {source_path}")
    source = load_checkpoint(source_path)
    robust, robust_admitted = None, True
    if config.robust_epochs:
        validation = load_images(manifest, "phase_contrast", "val", config.markers, percentiles=source.percentiles)
        robust, admission, again = robust_with_second_try(
            source.generator, validation, config.markers, lambda: _robust_source(config, source_config, source_path, out, log),
            lambda: _robust_source(config, source_config, source_path, out, log, again=True), log=lambda line: log(f"[demo] {line}"))
        check_robust_rows(out, out / "models" / ROBUST_FILES[again], fix=f"give the demo another --out, or move {out} aside")
        robust_admitted = admission.admitted

    domains = [TargetDomain.parse(t) for t in config.targets]
    grid = Grid(targets=[domain.name for domain in domains], layers=config.layers, lrs=[config.adapt_lr], seeds=[config.seed],
                paper_layers="last" if config.paper else [], families=config.families, family_layers=config.family_layers)
    rows = run_grid(source, manifest, domains, grid.points(source.generator.num_layers), {"steps": config.adapt_steps},
                    seed=config.seed, source_setting="phase_contrast", out=out, baselines=tuple(config.baselines),
                    selector_options=SelectionSpec().options(),
                    oracle=source_config if config.oracle else None, robust=robust, robust_admitted=robust_admitted,
                    save_models=True, log=log)
    log("")
    log(summary_table(rows))
    log("")
    log("Which model to use, chosen without target labels (lmadda.selection.selector; Pearson on the test fields):")
    for line in choice_lines(rows):
        log(f"  {line}")
    log("")
    for line in domain_lines(source, manifest, domains):
        log(line)
    for path in write_report(rows, out / "report"):
        log(f"[demo] wrote {path}")
    for domain in domains:
        log(f"[demo] sample panel: {_panel(source, robust, manifest, domain, rows, out, config.seed)}")
    log(f"[demo] done in {time.perf_counter() - start:.0f} s; results in {out}/results.parquet, figures in {out}/report/")
    return out


def _robust_source(config: DemoConfig, source_config: SourceTrainConfig, source_path: Path, out: Path, log,
                   again: bool = False) -> GeneratorCheckpoint:
    """The source model fine-tuned on augmented copies of its training fields (lmadda.data.augment): what a lab would
    train instead of adapting, and a candidate of the label-free choice; `again`: its second try, recognisable copies
    only (lmadda.training.robust). Reused when it exists."""
    path = out / "models" / ROBUST_FILES[again]
    robust_config = SourceTrainConfig.model_validate(source_config.model_copy(update={
        "epochs": config.robust_epochs, "init_from": source_path, "augment": NuisanceAugmentation(min_size=config.size)}).model_dump())
    if again:
        robust_config = second_try(robust_config)
    if path.exists():
        _check_reusable(path, robust_config, out)
        log(f"[demo] reusing robust source model {path}")
    else:
        result = train_source(robust_config, path)
        log(f"[demo] robust source model{' (second try)' if again else ''}: best validation Pearson {result.best_val_pearson:.3f} "
            f"on clean and augmented fields ({result.seconds:.0f} s) -> {path}")
    return load_checkpoint(path)


def _check_reusable(path: Path, config: SourceTrainConfig, out: Path) -> None:
    """A model an earlier demo left is reused only if it was trained as this demo trains it: the results beside it
    were measured with it."""
    changed = changed_options(path, config)
    if changed:
        raise LmaddaError(f"{path} was trained with other options than this demo's ({'; '.join(changed)}), and the results in "
                          f"{out} were measured with it: give the demo another --out, or move {out} aside, and run again")


def domain_lines(source, manifest: Manifest, domains: list[TargetDomain]) -> list[str]:
    """The source model's own domain check (lmadda.domain) on one test field of its setting and of each target:
    what `lmadda predict` and the endpoint tell a lab image by image."""
    if source.domain_reference is None:
        return ["[demo] the source model has no domain reference (written before lmadda had one); add it with "
                "`lmadda diagnose --add-reference CHECKPOINT --manifest MANIFEST`"]
    lines = [f"Is this image in domain? The source model's check (thresholds {source.domain_reference.thresholds[0]:.2f} / "
             f"{source.domain_reference.thresholds[1]:.2f}, set on held-out {source.setting} fields):"]
    for name, setting, shift in [(source.setting, source.setting, None), *((d.name, d.setting, d.shift) for d in domains)]:
        image = load_images(manifest, setting, "test", source.markers, shift=shift, percentiles=source.percentiles)[0]
        tile = fitting_tile(image.input.shape, source.generator.config.multiple)
        _, domain = predict_and_score(source.generator, source.domain_reference, image.input, tile=tile)
        lines.append(f"  {name:<34} field {image.field}: score {domain.score:5.2f} -> {domain.verdict}")
    return lines


def _chosen_model(name: str, source, robust, manifest: Manifest, domain: TargetDomain, seed: int, out: Path):
    """The (generator, input transform) of the label-free choice `name`: a correction (of the source or the robust
    model) is built again (cheap, seeded as the study builds it), an adapted model is read from the file `run_grid` saved."""
    if is_baseline(name) or name in ROBUST_VARIANTS:
        model, baseline = (robust, ROBUST_VARIANTS[name]) if name in ROBUST_VARIANTS else (source, name)
        source_train = load_images(manifest, "phase_contrast", "train", percentiles=source.percentiles)
        target_train = load_images(manifest, domain.setting, "train", shift=domain.shift, percentiles=source.percentiles, seed=seed)
        return build_baseline(baseline, model.generator, source_train, target_train, seed=seed)
    method, _, rest = name.partition(":")
    layer = int(rest.split("@")[0])
    recipe = "paper" if method.endswith("_paper") else "lmadda"
    family = "lmadda" if method in ("lmadda", "adda", "lmadda_paper", "adda_paper") else method
    model = load_checkpoint(out / "models" / model_file_name(domain.name, layer, recipe, family))
    return model.generator, input_correction(model.metadata)


def _panel(source, robust, manifest: Manifest, domain: TargetDomain, rows: list[dict], out: Path, seed: int) -> Path:
    """Input / truth / unadapted / the label-free choice, first marker, first test field: what a lab would get."""
    marker = source.markers[0]
    chosen = next(r["chosen"] for r in rows if r["target"] == domain.name and r["method"] == "label_free")
    generator, transform = _chosen_model(chosen, source, robust, manifest, domain, seed, out)
    image = load_images(manifest, domain.setting, "test", source.markers, shift=domain.shift, percentiles=source.percentiles,
                        seed=seed + SPLIT_SEED_OFFSET["test"])[0]
    unadapted = target_from_model_range(predict_tiled(source.generator, image.input))[0]
    prediction = target_from_model_range(predict_tiled(generator, transform(image.input) if transform else image.input))[0]
    images = {"input": image.input[0], "truth": target_from_model_range(image.target[0]), "unadapted": unadapted, "adapted": prediction}
    return stain_panel(domain.name, marker, f"label-free choice: {chosen}", images, out / "report" / panel_file_name(domain.name),
                       title=f"{domain.name}, field {image.field}")


def served_registry(demo_out: Path) -> str:
    """The MLflow store the demo's quick sweep (tune/configs/quick.yaml) promoted its models into."""
    return f"sqlite:///{(Path(demo_out) / 'sweeps' / 'mlflow.db').resolve()}"


def serving_input(demo_out: Path) -> tuple[Path, str]:
    """`lmadda serve --demo`'s request: an overexposed (x2.5) test-split phase-contrast image of a finished demo, written
    as a TIFF under DEMO_OUT/serve, and the registry alias the demo promoted for that setting."""
    manifest_path = demo_out / "data" / "manifest.parquet"
    if not manifest_path.is_file():
        raise LmaddaError(f"{manifest_path} not found; run `make demo` (or `lmadda demo --out {demo_out}`) first")
    manifest = Manifest.load(manifest_path)
    row = manifest.inputs("phase_contrast", "test")[0]
    raw = read_image(manifest.resolve(row))
    shift = Shift.parse(SERVED_SHIFT)
    pixels = shift.apply_input(raw.pixels, raw.sensor_max)
    path = write_tiff(demo_out / "serve" / f"{row.field}_phase_contrast_{SERVED_SHIFT.replace(':', '_').replace('.', '_')}.tif",
                      pixels[0], dtype=raw.dtype)
    return path, alias_for(f"phase_contrast+{SERVED_SHIFT}")
