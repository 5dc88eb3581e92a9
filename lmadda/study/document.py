"""The study document (its config's `document`, e.g. docs/study.md), written from the study's MLflow runs.

Every number comes from the tracking store through `lmadda.study.analysis`; this module only puts the
tables, figures and verdicts into words, so the document cannot say more than the runs show.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from lmadda.core.version import __version__
from lmadda.study.analysis import (CEILING_BAR, HARM_BAR, MIN_GAP, NOISE_FLOOR, RECOVERY_BAR, ROBUST_COST_BAR, TIE, Bar, Bars, Claim,
                                   Findings, bars,
                                   criterion_scores, findings, reference_regrets, selection_rows, summary_records, write_summary)
from lmadda.study.config import ExperimentSpec, StudyConfig
from lmadda.study.failures import failed_targets_section
from lmadda.study.figures import plot_by_layer, plot_profiles, plot_selection, plot_vs_magnitude, shrink_png
from lmadda.study.results import ADAPTED, CRITERIA, PUBLISHED_BASELINE, Results
from lmadda.study.runner import experiment_name
from lmadda.study.tables import (choice_table, family_table, layer_table, lr_table, main_table, movement_table, multi_layer_table,
                                 per_marker_table, predictor_table, selection_table)
from lmadda.study.tracking import read_study
from lmadda.training.adapt import AdaptConfig


# ------------------------------------------------------------------------------------ the verdicts


def _met(bar: Bar) -> str:
    return "met" if bar.met else "**not met**"


def bars_lines(judged: Bars | None) -> list[str]:
    """The adaptation issue's three bars, in words."""
    if judged is None:
        return [f"- No target has an oracle gap of at least {MIN_GAP}: the bars below cannot be judged."]
    recovery, cheap, harm = judged.recovery, judged.as_good_as_cheap, judged.harm
    lines = [f"- Targets with an oracle gap of at least {MIN_GAP}: {judged.gapped} of {judged.scored}.",
             f"- Recovers at least {RECOVERY_BAR:.0%} of the gap: {recovery.passed} of {recovery.of} (bar: {recovery.need}) — {_met(recovery)}"
             + (f"; not on {', '.join(recovery.failing)}" if recovery.failing else "")]
    if judged.ceilings:
        line = "  - Even the best single model chosen with test labels recovers " + ", ".join(
            f"{'—' if value is None else f'{value:.0%}'} on {name}" for name, value in judged.ceilings.items()) + "."
        if len(judged.beyond_reach) == len(judged.ceilings):
            line += " No candidate gets there, so no label-free rule over these candidates could: the adaptation falls short, not the choice."
        elif judged.beyond_reach:
            line += f" On {', '.join(judged.beyond_reach)} no candidate gets there; elsewhere the choice missed a better candidate."
        lines.append(line)
    lines += [f"- At least as good as the best cheap baseline (within {TIE}): {cheap.passed} of {cheap.of} (bar: {cheap.need}) — {_met(cheap)}",
              f"- Worse than the unadapted model by more than {HARM_BAR}: {len(harm.failing)} of {harm.of} (bar: 0) — {_met(harm)}"
              + (f" ({', '.join(harm.failing)})" if harm.failing else "")]
    if judged.ceiling is not None:
        ceiling = judged.ceiling
        lines.append(f"- The best single candidate with test labels (the portfolio's ceiling) recovers at least {CEILING_BAR:.0%} of the "
                     f"gap: {ceiling.passed} of {ceiling.of} (bar: {ceiling.need}) — {_met(ceiling)}"
                     + (f"; not on {', '.join(ceiling.failing)}" if ceiling.failing else ""))
    for experiment, cost in judged.robust_cost.items():
        verdict = "met" if cost <= ROBUST_COST_BAR else "**not met**"
        admission = judged.robust_admission.get(experiment)
        admitted = "" if admission is None else (
            f"; on the source's validation fields {admission['robust']:.3f} against {admission['plain']:.3f}, so the selector "
            + ("saw its rows" if admission["admitted"] else "never saw its rows (refused: more than 0.01 lower)")
            + ("; this is the second try, recognisable copies only, after the first was refused" if admission.get("second_try") else ""))
        lines.append(f"- {experiment}: the robust source model gives up {cost:+.3f} in-domain test Pearson against the plain "
                     f"source (bar: at most {ROBUST_COST_BAR}) — {verdict}{admitted}")
    return lines


def _claim_line(claim: Claim) -> str:
    details = "; ".join(f"{g.target}: {g.gain:+.3f}{f' ± {g.spread:.3f}' if g.spread else ''}{f' ({g.where})' if g.where else ''}"
                        for g in claim.gains)
    return f"- {claim.statement}: **{len(claim.held)} of {len(claim.gains)} targets**" + (f" ({details})" if claim.gains else "")


def findings_lines(found: Findings) -> list[str]:
    """"What held up", in words."""
    adda = found.claim("adda_beats_unadapted")
    adda_line = _claim_line(adda)
    if found.adda_never_moved:
        adda_line += (f". In {len(found.adda_never_moved)} of {len(adda.gains)} targets ADDA's G' never moved (its discriminator never "
                      "passed the gate), so these say nothing about matching the last layer, only that D found no shift there "
                      "within the steps given")
    lines = [adda_line, *(_claim_line(claim) for claim in found.claims[1:])]
    early = found.overexposure_best_layers
    if early:
        lines.append("- Best matched layer for overexposure: " + ", ".join(f"{t}: layer {l} (of {n} layers swept)" for t, l, n in early)
                     + f"; an early encoder layer (0-3) in {sum(l <= 3 for _, l, _ in early)} of {len(early)} targets.")
    multi = found.multi_layer
    if multi:
        worse = sum(m.vs_best_single < -NOISE_FLOOR for m in multi)
        lines.append(f"- Multi-layer matching: {worse} of {len(multi)} layer sets score below the best single layer by more than "
                     f"{NOISE_FLOOR}; {sum(m.vs_adda > NOISE_FLOOR for m in multi)} of {len(multi)} beat ADDA by more than that.")
    criterion = found.best_criterion
    if criterion is not None:
        score, baseline, reference = found.scores[criterion], found.scores.get(PUBLISHED_BASELINE, {}), found.reference
        text = (f"- Lowest-regret label-free criterion: `{criterion[3:]}` (Spearman {score['spearman']:.2f}, regret "
                f"{score['regret']:.3f} over {score['targets']} targets)")
        if baseline.get("targets"):
            text += (f"; the published baseline, seed disagreement: Spearman {baseline['spearman']:.2f}, regret {baseline['regret']:.3f} "
                     f"over {baseline['targets']} targets")
        text += (f". Without any criterion: always ADDA loses {reference['always ADDA']:.3f}, a random configuration "
                 f"{reference['random configuration (expected)']:.3f} on average")
        lines.append(text + ".")
    moved, known = found.moved
    if known:
        lines.append(f"- G' moved at all in {moved} of {known} adapted models; the others "
                     "stayed the source model because the discriminator never passed the gate (table above).")
    if found.oracle_below:
        below = "; ".join(f"{target}: {oracle:.3f} vs {unadapted:.3f}" for target, oracle, unadapted in found.oracle_below)
        lines.append(f"- The oracle scores below the unadapted model on {len(found.oracle_below)} target(s) ({below}): "
                     "fine-tuned on the target pairs of the training fields only (likely overfitting them), it is no upper bound here.")
    lines.append("- Every comparison uses the target labels that the label-free criteria never see. "
                 f"A difference counts when it exceeds twice the seed spread and {NOISE_FLOOR}.")
    return lines


# ------------------------------------------------------------------------------------------ document


def _git_commit() -> str:
    """lmadda's own commit: only when the installed package is the `lmadda/` folder of a git checkout (an editable
    install of the repository). The working directory's repository, or one that happens to hold site-packages, is a
    lab's own and says nothing about lmadda."""
    package = Path(__file__).resolve().parents[1]  # .../lmadda
    try:
        top = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             check=True).stdout.strip()
        if Path(top).resolve() != package.parent or not (package.parent / "pyproject.toml").is_file():
            return "unknown"
        return subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _relative_path(path: Path, document: Path) -> str:
    try:
        return str(path.relative_to(document.parent))
    except ValueError:
        return str(path)


def _relative(path: Path, document: Path) -> str:
    """The figure's path as the document links it (every linked figure is shrunk first)."""
    shrink_png(path)
    return _relative_path(path, document)


def experiment_section(spec: ExperimentSpec, config: StudyConfig, config_path: Path | str = "...") -> tuple[list[str], dict[str, float]]:
    """The document's section for one experiment, and the regret of each label-free choice there."""
    models, profiles, artifacts, _ = read_study(config.tracking_uri, experiment_name(spec))
    lines = [f"## {spec.title}", "", spec.about.strip(), "", *failed_targets_section(config.out / spec.name)]
    if not models:
        return lines + [f"No results in MLflow yet: run `lmadda study --config {config_path} --only {spec.name}`.", ""], {}
    results = Results(models, profiles)
    adapted = sum(m["method"] in (*ADAPTED, "lmadda_multi") for m in models)
    seeds = sorted({m["seed"] for m in models})
    lines += [f"{adapted} adapted models, seeds {', '.join(map(str, seeds))}; adaptation options {spec.adapt}. "
              f"Pearson is per test image, averaged over markers ({', '.join(results.markers)}) and test images; "
              "± is the standard deviation over seeds; * marks a collapsed run.", ""]
    figures = config.figures
    prefix = spec.name

    lines += ["### Pearson by method", "", *main_table(results), "",
              "ADDA (published) is Tzeng et al.'s recipe (no gate, one learning rate, `recipe: paper`); ADDA (lmadda recipe) "
              "and LM-ADDA use this project's stabilised recipe at the learning rate the rule below picks. \"best LM-ADDA\" "
              "is the best layer by labelled test Pearson (an upper bound on what a lab without labels gets); the "
              "label-free choice is what the selector picked per seed without labels (see \"Which model to use\"). "
              "The oracle is the source model fine-tuned on target pairs (first seed only).", "",
              "<details><summary>Per marker</summary>", "", *per_marker_table(results), "", "</details>", ""]
    lr_lines = lr_table(results)
    if len(lr_lines) > 2:
        lines += ["### Learning-rate rule", "",
                  "The paper keeps only learning rates that collapse at no layer (here: a non-finite or unbounded "
                  "generator loss, or a saturated discriminator) and reports the best of those; the tables above and "
                  "below use, per target, the stable rate with the best mean Pearson over all layers (a choice that "
                  "uses labels, as the paper's does). When none is stable the smallest is used.", "", *lr_lines, ""]
    movement = movement_table(results)
    if movement:
        adapt_options = AdaptConfig(layer=[0], **spec.adapt)
        lines += ["### Did the adapted generator move?", "",
                  f"G' steps only while the discriminator's running accuracy is at least the gate ({adapt_options.gate_accuracy}) "
                  f"after {adapt_options.d_warmup_steps} D-only steps: when D cannot tell target from source features "
                  f"within the {adapt_options.steps} steps, G' keeps "
                  "the source weights and the \"adapted\" model is the unadapted one. Counted per model:", "", *movement, ""]
    by_layer = layer_table(results)
    if by_layer:
        lines += ["### Pearson by matched layer", "", *by_layer, "",
                  "Bold: the best layer per target." + (" ° G' never moved in any seed: the model is the source model." if movement else ""), ""]
    figure = plot_by_layer(results, figures / f"{prefix}_pearson_by_layer.png")
    if figure:
        lines += [f"![Pearson by matched layer]({_relative(figure, config.document)})", ""]
    figure = plot_vs_magnitude(results, figures / f"{prefix}_pearson_vs_magnitude.png")
    if figure:
        lines += ["### Pearson vs shift magnitude", "", f"![Pearson vs magnitude]({_relative(figure, config.document)})", ""]
    multi = multi_layer_table(results)
    if multi:
        lines += ["### Single-layer vs multi-layer matching", "",
                  "The paper's \"less is more\": matching one well-chosen layer against matching several at once "
                  "(one discriminator per layer, equal weights).", "", *multi, ""]
    if artifacts is not None and (artifacts / "panels").is_dir():
        lines += ["### Sample panels", "", "Input, truth, unadapted and the best adapted layer, first marker, centre of the first test field.", ""]
        for panel in sorted((artifacts / "panels").glob("*.png")):
            copied = figures / f"{prefix}_{panel.name}"
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(panel, copied)
            lines += [f"![{panel.stem}]({_relative(copied, config.document)})", ""]

    scores = criterion_scores(results)
    reference = reference_regrets(selection_rows(results))
    selection = selection_table(results, scores, reference)
    lines += ["### Choosing the layer without target labels", "",
              "Each candidate is one (layer, learning rate) configuration, seeds averaged. Spearman: rank correlation of "
              "the criterion (lower is better) with the labelled Pearson per target, averaged over targets; regret: "
              "Pearson lost by taking the criterion's choice instead of the truly best configuration.", "", *selection, ""]
    figure = plot_selection(results, [c for c in CRITERIA], figures / f"{prefix}_criteria.png")
    if figure:
        lines += [f"![criteria vs Pearson]({_relative(figure, config.document)})", ""]
    predictor = predictor_table(results)
    if predictor:
        lines += ["**Zero-training layer predictor.** The unadapted source model runs once on source and target crops; "
                  "the discrepancy after each layer is the mean channel shift in units of the source's spread; the "
                  "predicted layer is the first that reaches half of the profile's maximum (a rule fixed before "
                  "looking at any result).", "", *predictor, ""]
        figure = plot_profiles(results, figures / f"{prefix}_profiles.png")
        if figure:
            lines += [f"![discrepancy profiles]({_relative(figure, config.document)})", ""]
    lines += ["### What held up", "", *findings_lines(findings(results, scores, reference)), ""]
    return lines, {c: s["regret"] for c, s in scores.items() if s["targets"]} | reference


def write_study_document(config: StudyConfig, config_path: Path | str = "...") -> Path:
    """`config_path`: the config file as `lmadda study --config` was given it (the document's provenance)."""
    config.figures.mkdir(parents=True, exist_ok=True)
    lines = [f"# {config.title}", "",
             f"Generated by `lmadda study --config {config_path}` from the MLflow runs in `{config.tracking_uri.split('/')[-1]}` "
             f"(lmadda {__version__}, commit {_git_commit()}, {datetime.now(timezone.utc):%Y-%m-%d}). Do not edit by hand: "
             f"change the config or the code and regenerate. `lmadda study --config {config_path} --document-only` rewrites "
             "this file from the tracking store without running anything.", ""]
    sections, records = [], []
    for spec in config.experiments:
        section, _ = experiment_section(spec, config, config_path)
        sections += section
        augment = spec.robust_config().augment if spec.robust is not None else None
        record = read_study(config.tracking_uri, experiment_name(spec))
        records += summary_records(spec.name, record.models, augment, record.facts)
    if records:
        summary = write_summary(records, config.figures / "summary.json")
        lines += ["## Which model to use: the label-free choice", "",
                  "For every target, `lmadda.selection.selector` chose among the unadapted model, the cheap corrections, the zoom, the "
                  "robust source model and every adapted model (LM-ADDA at each layer, the other families, ADDA with this "
                  "project's recipe and as published) without target labels, and kept the default model unless a candidate was "
                  "confidently better: the robust source model where it was admitted (its in-domain validation Pearson within "
                  "0.01 of the plain model's), else the unadapted model (docs/method.md). The same selector backs "
                  "`lmadda adapt --layer auto` and `lmadda sweep promote`, which have no robust model and keep the unadapted "
                  "one. Test Pearson, averaged over markers, "
                  "test images and seeds; \"best with labels\" is the best single model by test Pearson, an optimistic bound "
                  "no lab without labels can reach; gap recovered is (choice - unadapted) / (oracle - unadapted). "
                  f"Machine-readable: [{summary.name}]({_relative_path(summary, config.document)}).", "",
                  *choice_table(records), "", "**The bars set for the label-free choice** (issues \"Adaptation that pays off\" and "
                  "\"Recover the gap that adversarial matching leaves\"):", "", *bars_lines(bars(records)), "",
                  "### Who wins where: every family", "",
                  "Each family's best configuration on each target, chosen WITH test labels (a per-family ceiling, not what a lab "
                  "gets; the label-free choice above is). Test Pearson, seeds averaged. \"covered\": the robust source model's "
                  "augmentation replays this target's shift; bright field, another experiment and real defocus planes are never "
                  "covered. docs/method.md says why each family wins where it does.", "", *family_table(records), ""]
    lines += sections
    config.document.parent.mkdir(parents=True, exist_ok=True)
    config.document.write_text("\n".join(lines).rstrip() + "\n")
    return config.document
