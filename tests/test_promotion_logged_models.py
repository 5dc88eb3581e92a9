"""Promotion registers each chosen generator as an MLflow LoggedModel, and the registry and the endpoint follow it.

The sweep's trials are fake rows (no Ray) with real, tiny generator checkpoints: what is under test is
`lmadda.sweep.promotion.promote` and `register_checkpoint` (run -> LoggedModel -> registry version), the endpoint's
model cache (`lmadda_serve.registry.StainModels`) and `lmadda runs compare` (`lmadda.sweep.tracking.compare_runs`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlparse

import pytest

from lmadda.core.errors import LmaddaError

TARGET = "phase_contrast+overexposure:2"
ALIAS = "phase_contrast-overexposure-2"
QUIET = {"log": lambda *_: None}


def _checkpoint(path: Path, seed: int) -> Path:
    import torch

    from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
    from lmadda.models import GeneratorConfig, UNetGenerator

    torch.manual_seed(seed)
    generator = UNetGenerator(GeneratorConfig(in_channels=1, out_channels=2, ngf=2, depth=6))
    return Path(save_checkpoint(path, GeneratorCheckpoint(generator=generator, markers=["dapi", "cd29"], setting="phase_contrast")))


@pytest.fixture
def sweep(tmp_path, migrated_store) -> SimpleNamespace:
    """A logged sweep of two trials: layer 11 beats layer 1 on both markers."""
    from lmadda.sweep.tracking import log_sweep

    storage = tmp_path / "sweeps"
    storage.mkdir()
    shutil.copy(migrated_store, storage / "mlflow.db")
    config = SimpleNamespace(
        name="lm", storage_path=storage, tracking_uri=f"sqlite:///{storage / 'mlflow.db'}", experiment="lmadda-lm",
        source=SimpleNamespace(checkpoint=tmp_path / "source.pt"), adapt={"steps": 4},
        data=SimpleNamespace(manifest=tmp_path / "manifest.parquet", source_setting="phase_contrast"),
        grid=SimpleNamespace(targets=[TARGET]))
    rows = []
    for layer, dapi, cd29 in ((1, 0.5, 0.4), (11, 0.7, 0.6)):
        generator = _checkpoint(tmp_path / f"trial{layer}" / "generator.pt", seed=layer)
        rows.append({"point": f"{ALIAS}-L{layer}-lr0.0001-s0", "target": TARGET, "setting": "phase_contrast", "shift": "overexposure", "magnitude": 2.0,
                     "method": "lmadda", "layer": layer, "matched": str(layer), "lr": 1e-4,
                     "seed": 0, "steps_done": 4, "collapsed": False, "collapse_reason": "", "generator_path": str(generator),
                     "pearson_dapi": dapi, "pearson_cd29": cd29, "lf_output_w1": 0.1 * layer,
                     "_history": [{"step": 2, "g_loss": 1.0, "d_loss": 0.7, "d_acc": 0.5}, {"step": 4, "g_loss": 0.9, "d_loss": 0.6, "d_acc": 0.6}]})
    (tmp_path / "results.parquet").write_bytes(b"table")
    log_sweep(config, rows, [tmp_path / "results.parquet"], **QUIET)
    config.winner = tmp_path / "trial11" / "generator.pt"
    return config


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _stored_file(model) -> Path:
    """The LoggedModel's copy of the generator: the file the registry serves."""
    return Path(unquote(urlparse(model.artifact_location).path)) / "generator.pt"


def _promote(sweep) -> list[dict]:
    from lmadda.sweep.promotion import promote

    return promote(sweep.tracking_uri, sweep.experiment, criterion="pearson", **QUIET)


def test_promotion_makes_a_ready_logged_model_of_the_winning_trial_with_its_params_and_metrics(sweep):
    from lmadda.core.registry_names import file_sha256

    promoted = _promote(sweep)
    client = _client(sweep.tracking_uri)
    assert sorted(p["model"] for p in promoted) == ["lmadda-cd29", "lmadda-dapi"]
    assert len({p["model_id"] for p in promoted}) == 1  # one generator file wins both markers: one LoggedModel
    model = client.get_logged_model(promoted[0]["model_id"])
    trial = client.get_run(model.source_run_id)
    assert str(model.status) == "READY" and model.model_type == "lmadda-generator"
    assert model.name == f"generator-{ALIAS}"
    assert trial.data.tags["lmadda.kind"] == "trial" and trial.data.tags["layer"] == "11" and promoted[0]["run_id"] == trial.info.run_id
    assert model.params["layer"] == "11" and model.params["lr"] == "0.0001" and model.params["adapt.steps"] == "4"
    metrics = {m.key: m.value for m in model.metrics}
    assert metrics["pearson_dapi"] == pytest.approx(0.7) and metrics["pearson_cd29"] == pytest.approx(0.6)
    assert all(m.model_id == model.model_id and m.run_id == trial.info.run_id for m in model.metrics)
    assert trial.data.metrics["pearson_dapi"] == pytest.approx(0.7)  # the run's own results are unchanged
    assert [output.model_id for output in trial.outputs.model_outputs] == [model.model_id]
    assert [a.path for a in client.list_logged_model_artifacts(model.model_id)] == ["generator.pt"]  # lmadda's file, as it is
    assert model.tags["sha256"] == file_sha256(_stored_file(model)) == file_sha256(sweep.winner)


def test_each_registry_version_is_created_from_the_logged_model(sweep):
    import json

    promoted = _promote(sweep)
    client = _client(sweep.tracking_uri)
    model = client.get_logged_model(promoted[0]["model_id"])
    for entry in promoted:
        version = client.get_model_version(entry["model"], entry["version"])
        assert version.source == f"models:/{model.model_id}"
        assert version.run_id == model.source_run_id
        assert version.tags["sha256"] == model.tags["sha256"] and version.tags["criterion"] == "pearson"
        assert client.get_model_version_by_alias(entry["model"], ALIAS).version == version.version
    assert sorted((v["name"], str(v["version"])) for v in json.loads(model.tags["mlflow.modelVersions"])) == [
        ("lmadda-cd29", "1"), ("lmadda-dapi", "1")]  # the LoggedModel names its versions, as mlflow.register_model records it


def test_the_endpoint_resolves_and_loads_a_promoted_logged_model_and_refuses_a_swapped_file(sweep, tmp_path):
    from lmadda_serve.registry import StainModels

    promoted = _promote(sweep)
    models = StainModels(sweep.tracking_uri, tmp_path / "cache")
    ref = models.resolve("dapi", ALIAS)
    assert ref.model_id == "lmadda-dapi/1" and dict(ref.tags)["sha256"]
    assert models.load(ref.model_id).markers == ["dapi", "cd29"]
    stored = _stored_file(_client(sweep.tracking_uri).get_logged_model(promoted[0]["model_id"]))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))  # the LoggedModel's file swapped after promotion
    with pytest.raises(LmaddaError, match="differs from the registered"):
        StainModels(sweep.tracking_uri, tmp_path / "fresh-cache").load(ref.model_id)


def test_runs_compare_lists_the_logged_models_with_their_versions_and_aliases(sweep):
    from lmadda.sweep.tracking import compare_runs

    before = compare_runs(sweep.tracking_uri, sweep.experiment)
    assert "LoggedModels): none;" in before
    promoted = _promote(sweep)
    table = compare_runs(sweep.tracking_uri, sweep.experiment)
    line = next(line for line in table.splitlines() if line.startswith(promoted[0]["model_id"]))
    assert f"generator-{ALIAS}" in line and "READY" in line and f"{ALIAS}-L11-lr0.0001-s0" in line
    assert "pearson_cd29 0.600, pearson_dapi 0.700" in line
    assert f"lmadda-cd29 v1@{ALIAS}; lmadda-dapi v1@{ALIAS}" in line
    assert table.splitlines()[0].startswith("target")  # the trial table comes first, as before


def test_promoting_again_adds_versions_to_the_same_logged_model(sweep):
    from lmadda.sweep.tracking import compare_runs

    first = _promote(sweep)
    second = _promote(sweep)
    client = _client(sweep.tracking_uri)
    assert {p["model_id"] for p in second} == {first[0]["model_id"]}  # no second copy of the generator
    assert [p["version"] for p in second] == [2, 2]
    experiment = client.get_experiment_by_name(sweep.experiment).experiment_id
    assert len(client.search_logged_models([experiment])) == 1
    line = next(line for line in compare_runs(sweep.tracking_uri, sweep.experiment).splitlines() if line.startswith(first[0]["model_id"]))
    assert line.endswith(f"lmadda-cd29 v1,v2@{ALIAS}; lmadda-dapi v1,v2@{ALIAS}")  # the alias moved to the new versions


def test_a_logged_model_whose_stored_file_was_damaged_is_not_reused(sweep):
    from lmadda.core.registry_names import file_sha256

    first = _promote(sweep)
    client = _client(sweep.tracking_uri)
    _stored_file(client.get_logged_model(first[0]["model_id"])).write_bytes(b"damaged")
    second = _promote(sweep)
    fresh = client.get_logged_model(second[0]["model_id"])
    assert fresh.model_id != first[0]["model_id"] and str(fresh.status) == "READY"
    assert fresh.tags["sha256"] == file_sha256(sweep.winner)  # copied again from the trial run's file


def test_a_promotion_that_fails_midway_leaves_a_failed_logged_model_and_the_next_one_succeeds(sweep, monkeypatch):
    from mlflow.tracking import MlflowClient

    original = MlflowClient.log_model_artifacts

    def failing(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_model_artifacts", failing)
    with pytest.raises(OSError, match="disk full"):
        _promote(sweep)
    monkeypatch.setattr(MlflowClient, "log_model_artifacts", original)
    client = _client(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.experiment).experiment_id
    assert [str(m.status) for m in client.search_logged_models([experiment])] == ["FAILED"]
    promoted = _promote(sweep)
    assert str(client.get_logged_model(promoted[0]["model_id"]).status) == "READY"


def test_versions_registered_before_logged_models_still_resolve_and_load(sweep, tmp_path):
    """A store promoted by an older lmadda: versions with a `runs:/` source, no LoggedModel. Nothing of it is lost."""
    from lmadda.core.registry_names import file_sha256
    from lmadda_serve.registry import StainModels

    client = _client(sweep.tracking_uri)
    old = _checkpoint(tmp_path / "old" / "generator.pt", seed=7)
    experiment = client.get_experiment_by_name(sweep.experiment).experiment_id
    run = client.create_run(experiment, tags={"lmadda.kind": "choice"})
    client.log_artifact(run.info.run_id, str(old), "generator")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("lmadda-dapi")
    version = client.create_model_version("lmadda-dapi", f"runs:/{run.info.run_id}/generator/generator.pt", run_id=run.info.run_id,
                                          tags={"target": "bright_field", "marker": "dapi", "sha256": file_sha256(old)})
    client.set_registered_model_alias("lmadda-dapi", "bright_field", version.version)

    promoted = _promote(sweep)  # the new promotion lands beside the old version
    models = StainModels(sweep.tracking_uri, tmp_path / "cache")
    assert models.resolve("dapi", "bright_field").model_id == "lmadda-dapi/1"
    assert models.load("lmadda-dapi/1").markers == ["dapi", "cd29"]
    assert next(tmp_path.joinpath("cache").rglob("generator.pt")).read_bytes() == old.read_bytes()
    new = next(p for p in promoted if p["model"] == "lmadda-dapi")
    assert models.resolve("dapi", ALIAS).model_id == f"lmadda-dapi/{new['version']}" == "lmadda-dapi/2"
    assert models.load(f"lmadda-dapi/{new['version']}").markers == ["dapi", "cd29"]


def test_a_checkpoint_registered_outside_a_sweep_is_a_logged_model_the_endpoint_serves(tmp_path, migrated_store):
    from lmadda_serve.registry import StainModels
    from lmadda.sweep.promotion import register_checkpoint

    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    entry = register_checkpoint(uri, _checkpoint(tmp_path / "model.pt", seed=3), "dapi", "bright_field", experiment="outside")
    client = _client(uri)
    model = client.get_logged_model(entry["model_id"])
    assert str(model.status) == "READY" and model.name == "generator-bright_field" and model.params == {"checkpoint": "model.pt"}
    assert client.get_model_version("lmadda-dapi", entry["version"]).source == f"models:/{model.model_id}"
    models = StainModels(uri, tmp_path / "cache")
    assert models.load(models.resolve("dapi", "bright_field").model_id).markers == ["dapi", "cd29"]


def test_a_moved_store_serves_its_promoted_logged_models_from_the_new_place(sweep, tmp_path):
    """A LoggedModel's artifact location is an absolute file: URI too; opening the moved store re-points it."""
    from lmadda_serve.registry import StainModels

    first = _promote(sweep)
    moved = tmp_path / "elsewhere" / "sweeps"
    moved.parent.mkdir()
    shutil.move(str(sweep.storage_path), moved)
    sweep.tracking_uri = f"sqlite:///{moved / 'mlflow.db'}"
    models = StainModels(sweep.tracking_uri, tmp_path / "cache")
    assert models.load(models.resolve("dapi", ALIAS).model_id).markers == ["dapi", "cd29"]
    model = _client(sweep.tracking_uri).get_logged_model(first[0]["model_id"])
    assert _stored_file(model).is_relative_to(moved) and _stored_file(model).is_file()
    assert {p["model_id"] for p in _promote(sweep)} == {model.model_id}  # still found, still whole: reused


def test_a_label_free_choice_is_one_logged_model_for_every_marker_with_the_selectors_evidence(sweep, monkeypatch):
    import lmadda.sweep.label_free_promotion as label_free
    from lmadda.checkpoint import load_checkpoint
    from lmadda.selection.selector import Choice
    from lmadda.sweep.promotion import _promote_label_free

    client = _client(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.experiment).experiment_id
    choice = Choice(chosen="adabn", fell_back=False, reason="confidently better", score="consensus",
                    means={"unadapted": 0.3, "adabn": 0.2}, win_fraction={"adabn": 0.9})
    checkpoint = load_checkpoint(sweep.winner)
    checkpoint.metadata["label_free_choice"] = choice.as_dict()
    monkeypatch.setattr(label_free, "choose_per_target", lambda *args: {TARGET: {"choice": choice, "run": None, "checkpoint": checkpoint}})
    promoted = _promote_label_free(client, experiment, [], sweep=object(), **QUIET)
    assert sorted(p["model"] for p in promoted) == ["lmadda-cd29", "lmadda-dapi"] and len({p["model_id"] for p in promoted}) == 1
    model = client.get_logged_model(promoted[0]["model_id"])
    assert client.get_run(model.source_run_id).data.tags["lmadda.kind"] == "choice"
    assert model.params == {"criterion": "label_free", "chosen": "adabn", "fell_back": "false", "trial_run": ""}
    assert {m.key: m.value for m in model.metrics} == pytest.approx({"fell_back": 0.0, "selector_consensus": 0.2, "selector_win_fraction": 0.9})
    for entry in promoted:
        assert client.get_model_version(entry["model"], entry["version"]).source == f"models:/{model.model_id}"


def test_a_promotion_by_another_criterion_keeps_the_served_alias_unless_told_to_replace_it(sweep):
    """Issue: a Pearson promotion run as a job silently swapped the label-free promotion's served models. Now the
    serving alias stays with the criterion that set it; the other promotion lands beside it and says how to serve it."""
    from lmadda.sweep.promotion import promote

    client = _client(sweep.tracking_uri)
    served = {p["model"]: p["version"] for p in _promote(sweep)}  # by Pearson: layer 11 serves
    said = []
    other = promote(sweep.tracking_uri, sweep.experiment, criterion="lf_output_w1", log=said.append)  # picks layer 1
    for entry in other:
        assert entry["alias"] == f"{ALIAS}--lf_output_w1" and not entry["serving"]
        assert str(client.get_model_version_by_alias(entry["model"], ALIAS).version) == str(served[entry["model"]])
        scoped = client.get_model_version_by_alias(entry["model"], f"{ALIAS}--lf_output_w1")
        assert str(scoped.version) == str(entry["version"]) and scoped.tags["layer"] == "1"
    assert any(f"@{ALIAS} stays at version" in line and "--replace" in line for line in said)

    again = promote(sweep.tracking_uri, sweep.experiment, criterion="pearson", log=lambda *_: None)  # the holder's own criterion
    assert all(entry["serving"] and entry["alias"] == ALIAS for entry in again)
    replaced = promote(sweep.tracking_uri, sweep.experiment, criterion="lf_output_w1", replace=True, log=lambda *_: None)
    for entry in replaced:
        assert entry["serving"] and client.get_model_version_by_alias(entry["model"], ALIAS).tags["layer"] == "1"


def test_sweep_promote_takes_replace_on_the_command_line():
    from lmadda.cli import build_parser

    args = build_parser().parse_args(["sweep", "promote", "--config", "sweep.yaml", "--replace"])
    assert args.replace is True
    assert build_parser().parse_args(["sweep", "promote", "--config", "sweep.yaml"]).replace is False


def test_promoting_leaves_the_callers_mlflow_tracking_uri_as_it_was(sweep, monkeypatch):
    """mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI, which a sweep config and the endpoint read as the user's
    choice of store: a promotion to one store sent a later sweep of the same process (here, the test session) to it."""
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _promote(sweep)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    _promote(sweep)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
