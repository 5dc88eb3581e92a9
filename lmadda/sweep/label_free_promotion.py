"""Promotion without target labels: the one label-free selector (lmadda.selection.selector) over every candidate.

For each target of a sweep, the candidates are the unadapted source model, AdaBN, histogram
matching and every non-collapsed trial's adapted generator. The selector scores them on fixed crops
of the unlabelled target training images and keeps the unadapted model unless a candidate is
confidently better. The chosen model is registered under the target's alias for every marker:
a trial's own generator artifact, or, when the choice is the unadapted model or a cheap correction,
a checkpoint made for it (the source generator, AdaBN's generator, or the source generator with the
histogram-matching correction that `lmadda predict` and the endpoint then apply), logged to a
`choice` run of the sweep's experiment. Every version records the choice, its reason and the
checkpoint file's SHA-256 (`lmadda.sweep.promotion.log_generator_model`, hashed from the stored copy).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint, save_checkpoint
from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import load_images
from lmadda.data.manifest import Manifest
from lmadda.data.shifts import Shift
from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.evaluation.rows import TargetDomain
from lmadda.selection.selector import UNADAPTED, Candidate, Selector
from lmadda.study.config import SelectionSpec
from lmadda.study.grid import candidate_family
from lmadda.sweep.config import SweepConfig
from lmadda.training.auto import CHEAP_CANDIDATES, baseline_candidates, checkpoint_for


def _trial_candidate(client: MlflowClient, run, folder: Path, artifact_dir: str) -> tuple[Candidate, GeneratorCheckpoint]:
    artifacts = client.list_artifacts(run.info.run_id, artifact_dir)
    if not artifacts:
        raise LmaddaError(f"trial run {run.info.run_id} has no generator artifact; re-run the sweep")
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifacts[0].path, dst_path=str(folder / run.info.run_id))
    checkpoint = load_checkpoint(path)
    params = run.data.params
    method = params.get("method") or "lmadda"  # trial runs of sweeps before the study's params name no method
    paper = "/paper" if method.endswith("_paper") else ""
    family = candidate_family(method) or "lmadda"
    prefix = "moments" if family == "moments" else "lmadda"
    name = f"{prefix}:{params.get('matched') or params.get('layer')}@{float(params.get('lr')):g}/seed{params.get('seed')}{paper}"
    return Candidate(name, checkpoint.generator, family=family), checkpoint


def choose_per_target(client: MlflowClient, runs: list, sweep: SweepConfig, artifact_dir: str, log=print) -> dict[str, dict]:
    """target -> {'choice': Choice, 'run': the chosen trial run or None, 'checkpoint': the model to register}."""
    if not sweep.source.checkpoint.is_file():
        raise LmaddaError(f"source checkpoint {sweep.source.checkpoint} not found: the label-free choice compares every trial "
                          "with the unadapted model, so it needs the sweep's source model")
    source = load_checkpoint(sweep.source.checkpoint)
    manifest = Manifest.load(sweep.data.manifest)
    source_train = load_images(manifest, sweep.data.source_setting, "train", percentiles=source.percentiles)
    by_target: dict[str, list] = defaultdict(list)
    for run in runs:
        by_target[run.data.tags["target"]].append(run)
    options = SelectionSpec().options()
    chosen: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for target, target_runs in sorted(by_target.items()):
            domain = TargetDomain.parse(target)
            target_train = load_images(manifest, domain.setting, "train", shift=domain.shift, percentiles=source.percentiles)
            candidates = baseline_candidates(source, source_train, target_train)
            trials: dict[str, tuple[object, GeneratorCheckpoint]] = {}
            for run in target_runs:
                candidate, checkpoint = _trial_candidate(client, run, Path(folder), artifact_dir)
                candidates.append(candidate)
                trials[candidate.name] = (run, checkpoint)
            choice = Selector(source.generator, source_train, target_train, domain_reference=source.domain_reference,
                              **options).choose(candidates)
            run, checkpoint = trials.get(choice.chosen, (None, None))
            checkpoint = checkpoint_for(source, choice, candidates, target, checkpoint, target_images=target_train)
            log(f"[promote] {target}: label-free choice {choice.chosen} ({choice.reason})")
            shown = labelled_view(candidates, choice.chosen, manifest, domain.setting, domain.shift, source)
            if shown:
                log(f"[promote] {target}: test Pearson, measured after the choice: {shown}")
            chosen[target] = {"choice": choice, "run": run, "checkpoint": checkpoint}
    return chosen


def labelled_view(candidates: list[Candidate], chosen: str, manifest: Manifest, setting: str, shift: Shift | None, source) -> str:
    """Where the target has labelled test images: each candidate's Pearson, for the reader (the choice never sees it)."""
    try:
        images = load_images(manifest, setting, "test", source.markers, shift=shift, percentiles=source.percentiles)
    except LmaddaError:
        return ""  # no labels: nothing to show
    scores = {c.name: float(np.nanmean([r["pearson"] for r in evaluate_generator(c.generator, images, source.markers,
                                                                                   input_transform=c.input_transform)]))
              for c in candidates}
    trials = {name: value for name, value in scores.items() if name.startswith(("lmadda:", "moments:"))}
    best_trial = max(trials, key=trials.get) if trials else None
    parts = [f"chosen ({chosen}) {scores[chosen]:.3f}", f"unadapted {scores[UNADAPTED]:.3f}"]
    parts += [f"{name} {scores[name]:.3f}" for name in CHEAP_CANDIDATES]
    if best_trial:
        parts.append(f"best trial ({best_trial}) {trials[best_trial]:.3f}")
    return " | ".join(parts)


def log_choice_checkpoint(client: MlflowClient, experiment_id: str, target: str, checkpoint: GeneratorCheckpoint, artifact_dir: str) -> str:
    """A `choice` run holding the checkpoint made for a non-trial choice; returns its run id."""
    run = client.create_run(experiment_id, run_name=f"label-free choice {target}",
                            tags={"lmadda.kind": "choice", "target": target, "chosen": checkpoint.metadata["label_free_choice"]["chosen"]})
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "generator.pt", checkpoint)
        client.log_artifact(run.info.run_id, str(path), artifact_dir)
    client.set_terminated(run.info.run_id)
    return run.info.run_id
