"""The sweep config: one YAML file names the source model, the data, the grid and the resources.

    name: quick
    storage_path: out/sweeps                 # made absolute: Tune trials change directory
    source: {checkpoint: demo-out/models/source_phase_contrast.pt}   # + train: {...} to train it first
    data: {manifest: demo-out/data/manifest.parquet, source_setting: phase_contrast}
    grid:                                    # the study's grid (lmadda.study.config.Grid): one spec for both
      targets: [phase_contrast+overexposure:1.5, phase_contrast+overexposure:2.5]   # setting, or setting+shift:magnitude
      layers: [0, 3, 7, 15]                  # or all; layer_sets: [[0, 7]] adds multi-layer matching
      lrs: [2.0e-5, 1.0e-4]
      seeds: [0]
      paper_layers: []                       # layers also adapted as published (recipe: paper); default: last (ADDA)
    adapt: {steps: 60, batch_size: 4, saturation_collapses: true}   # any AdaptConfig option except layer, lr, seed;
                                             # collapse thresholds too (collapse_g_loss, saturation_*)
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0, max_concurrent_trials: 1,
                points_per_trial: auto}      # grid points one trial runs in turn, paying its start-up once
    mlflow: {tracking_uri: null, experiment: null}   # default: $MLFLOW_TRACKING_URI, else SQLite beside the sweep
"""

from __future__ import annotations

import json
import os
import re
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmadda.core.config import build_config, read_config_file
from lmadda.core.config import StrictModel
from lmadda.core.errors import LmaddaError
from lmadda.study.config import Grid
from lmadda.study.trial import GridPoint
from lmadda.training.adapt import AdaptConfig
from lmadda.training.source import SourceTrainConfig

# The families a sweep's Ray Train workers run: those of one AdaptConfig (the Adapter's DDP hooks).
SWEEP_FAMILIES = ("lmadda", "moments")


class SourceSpec(StrictModel):
    checkpoint: Path = Field(description="source generator checkpoint (train one with `lmadda train-source`)")
    train: dict | None = Field(None, description="SourceTrainConfig options: when the checkpoint does not exist yet, "
                                                 "train it first with Ray Train (same workers as the trials)")

    @model_validator(mode="after")
    def _train_options_valid(self) -> "SourceSpec":
        if self.train is not None:
            if "device" in self.train:
                raise ValueError("source.train: the device comes from the Ray Train worker; remove 'device'")
            SourceTrainConfig(**self.train)  # every option checked here, by name
        return self


class DataSpec(StrictModel):
    manifest: Path
    source_setting: str = "phase_contrast"


class ResourceSpec(StrictModel):
    workers_per_trial: int = Field(1, ge=0, description="Ray Train workers per trial; 0 runs the loop in the trial's own process "
                                                        "(no worker group to start: much faster for short single-device trials)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.01, gt=0, description="CPU reserved by each trial's driver function (it only waits)")
    max_failures: int = Field(1, ge=0, description="worker failures a trial survives, resuming from its last checkpoint")
    points_per_trial: int | Literal["auto"] = Field(
        "auto", description="grid points one trial runs one after another, loading the source model, the manifest and the "
                            "images (and starting its worker group) once; each point still reports, stops on collapse and "
                            "resumes on its own. auto: in-process trials (workers_per_trial 0) share the grid evenly over "
                            "max_concurrent_trials, worker-group trials run one point each")

    @field_validator("points_per_trial")
    @classmethod
    def _at_least_one(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError(f"points_per_trial must be at least 1 (or auto), got {value}")
        return value


class MlflowSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI (the k8s ConfigMap sets it), else "
                                                          "sqlite:///<storage_path>/mlflow.db")
    experiment: str | None = Field(None, description="default: lmadda-<sweep name>")


class SweepConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: Path
    source: SourceSpec
    data: DataSpec
    grid: Grid
    adapt: dict = Field(default_factory=dict)
    resources: ResourceSpec = ResourceSpec()
    mlflow: MlflowSpec = MlflowSpec()

    @field_validator("storage_path", mode="before")
    @classmethod
    def _a_folder_not_a_uri(cls, value):
        # Path("s3://bucket/sweeps") is the local folder "s3:/bucket/sweeps": refuse it rather than write there silently.
        if isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            raise ValueError(f"storage_path {value!r} is a URI; a sweep's trials hand their models and result rows to the driver "
                             "through a folder, so storage_path must be a folder every node of the cluster sees (local on one "
                             "machine, a shared volume such as NFS or a PVC on a cluster), not object storage")
        return value

    @model_validator(mode="before")
    @classmethod
    def _stop_moved(cls, values):
        if isinstance(values, dict) and "stop" in values:
            raise ValueError("the `stop` section is gone: collapse is decided by the adaptation loop, so its thresholds are "
                             "adapt options. Move them into `adapt`: g_loss_bound -> collapse_g_loss, d_saturation_accuracy -> "
                             "saturation_accuracy, d_saturation_patience -> saturation_patience, and add saturation_collapses: true")
        return values

    @model_validator(mode="before")
    @classmethod
    def _grid_is_the_studys(cls, values):
        """A config of the sweep's own, older grid (data.target_setting + data.shift, grid.layer/lr/magnitude/seed) is
        refused with its rewrite in the one grid spec, which the study uses too."""
        if not isinstance(values, dict):
            return values
        data, grid = values.get("data") or {}, values.get("grid") or {}
        if not (isinstance(data, dict) and isinstance(grid, dict)):
            return values
        if not ({"target_setting", "shift"} & set(data) or {"layer", "lr", "magnitude", "seed"} & set(grid)):
            return values
        setting, shift = data.get("target_setting", "bright_field"), data.get("shift")
        magnitudes = [f"{m:g}" if isinstance(m, (int, float)) else str(m) for m in grid.get("magnitude") or []]
        targets = [f"{setting}+{shift}:{magnitude}" for magnitude in magnitudes] if shift else [setting]
        rewrite = {"targets": targets, "layers": grid.get("layer", "all"), "lrs": grid.get("lr"), "seeds": grid.get("seed", [0]),
                   "paper_layers": []}
        raise ValueError("the sweep's grid is the study's grid now (the same spec for `lmadda study` and `lmadda sweep`): "
                         "remove data.target_setting and data.shift, and write the grid as "
                         f"grid: {json.dumps(rewrite)}")

    @model_validator(mode="after")
    def _consistent(self) -> "SweepConfig":
        forbidden = {"layer", "lr", "seed", "device"} & set(self.adapt)
        if forbidden:
            raise ValueError(f"adapt: {sorted(forbidden)} come from the grid or the workers; remove them from adapt")
        AdaptConfig(layer=[0], **self.adapt)  # every other option is checked here, by name
        not_here = [family for family in self.grid.families if family not in SWEEP_FAMILIES]
        if not_here:
            raise ValueError(f"grid.families: {not_here} run in the study and in `lmadda adapt --layer auto`; a sweep runs the "
                             f"families of one AdaptConfig ({', '.join(SWEEP_FAMILIES)}): remove the others")
        if self.adapt.get("stop_on_collapse") is False:
            raise ValueError("adapt.stop_on_collapse: a sweep's grid point ends where it collapses (the stopper reads that "
                             "report), so it cannot be turned off here; remove it")
        workers = max(1, self.resources.workers_per_trial)
        for where, batch in (("adapt", self.adapt.get("batch_size", AdaptConfig.model_fields["batch_size"].default)),
                             ("source.train", (self.source.train or {}).get("batch_size", SourceTrainConfig.model_fields["batch_size"].default))):
            if batch % workers:
                raise ValueError(f"{where}.batch_size {batch} is the effective batch and must split evenly over "
                                 f"resources.workers_per_trial = {workers}; make it a multiple of {workers}")
        return self

    def relative_paths(self) -> dict[str, Path]:
        """The config's paths that are relative (they resolve against the working directory, or `--base-dir`)."""
        paths = {"storage_path": self.storage_path, "source.checkpoint": self.source.checkpoint, "data.manifest": self.data.manifest}
        if self.source.train is not None and "manifest" in self.source.train:
            paths["source.train.manifest"] = Path(self.source.train["manifest"])
        return {name: path for name, path in paths.items() if not path.is_absolute()}

    def resolved(self, base: Path) -> "SweepConfig":
        """Relative paths made absolute against `base` (the config file's folder or the working directory)."""
        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else (base / path).resolve()

        train = self.source.train
        if train is not None and "manifest" in train:
            train = {**train, "manifest": str(absolute(Path(train["manifest"])))}
        return self.model_copy(update={
            "storage_path": absolute(self.storage_path),
            "source": self.source.model_copy(update={"checkpoint": absolute(self.source.checkpoint), "train": train}),
            "data": self.data.model_copy(update={"manifest": absolute(self.data.manifest)}),
        })

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.storage_path / 'mlflow.db'}"

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or f"lmadda-{self.name}"

    def points(self, num_layers: int) -> list[GridPoint]:
        """Every adapted model of the grid (`Grid.points`), its layers checked against a generator of `num_layers`."""
        return self.grid.points(num_layers)

    def points_per_trial(self, points: int) -> int:
        setting = self.resources.points_per_trial
        if setting != "auto":
            return setting
        if self.resources.workers_per_trial:  # long data-parallel trials: start-up is noise, a failure costs one point
            return 1
        return max(1, math.ceil(points / self.resources.max_concurrent_trials))

    def trial_groups(self, num_layers: int) -> list[list[GridPoint]]:
        """The grid dealt out into trials of at most `points_per_trial` points, each list in the order its trial runs them.

        Points are ordered by target and seed, then lr, then layers, and dealt like cards, back and forth
        (trial 0, 1, ..., n-1, n-1, ..., 0, ...), so concurrent trials get a similar mix of cheap early and costly
        late layers; within a trial they keep that order, so it loads each target's images once.
        """
        points = sorted(self.points(num_layers), key=lambda p: (p.target, p.seed, p.lr, p.recipe, p.family, p.layers))
        count = math.ceil(len(points) / self.points_per_trial(len(points)))
        groups: list[list[GridPoint]] = [[] for _ in range(count)]
        for index, point in enumerate(points):
            lap, seat = divmod(index, count)
            groups[seat if lap % 2 == 0 else count - 1 - seat].append(point)
        return [group for group in groups if group]


RAY_JOB_COPY = "working_dir_files"  # `ray job submit --working-dir` unpacks the repository under runtime_resources/working_dir_files/


def paths_base(config: SweepConfig, base_dir: Path | None, cwd: Path) -> Path:
    """The folder a sweep config's relative paths resolve against: `base_dir` (`--base-dir`) when given, else `cwd`.

    Under `ray job submit --working-dir .` the driver's working directory is Ray's uploaded copy of the repository,
    which leaves out git-ignored folders (demo-out/, models/, data/) and is deleted with the job: a relative path would
    find no input there and put the sweep's results where nobody sees them. So there a config with relative paths is
    refused, naming them and the two fixes."""
    if base_dir is not None:
        if not base_dir.is_absolute():
            raise LmaddaError(f"--base-dir {base_dir} must be an absolute folder (e.g. --base-dir $PWD)")
        return base_dir
    relative = config.relative_paths()
    if relative and RAY_JOB_COPY in cwd.parts:
        named = ", ".join(f"{name}: {path}" for name, path in relative.items())
        raise LmaddaError(f"this sweep runs in Ray's uploaded copy of the repository ({cwd}), which holds no git-ignored "
                          f"files and is deleted after the job, so the config's relative paths ({named}) cannot be used "
                          "here. On one machine (or a cluster sharing a disk at the same path) add --base-dir $PWD to the "
                          "command; otherwise give absolute paths on storage every node sees")
    return cwd


def load_sweep(path: Path, base_dir: Path | None = None) -> SweepConfig:
    """The sweep config in the YAML file `path`, validated, its relative paths resolved now (Tune trials change
    directory) against `base_dir` or the working directory, as `paths_base` rules."""
    sweep = build_config(SweepConfig, None, **read_config_file(path))
    return sweep.resolved(paths_base(sweep, base_dir, Path.cwd()))
