"""The endpoint's model cache (serve/registry.py) against a real, temporary MLflow registry (no Ray)."""

from pathlib import Path

import pytest

from lmadda.core.errors import LmaddaError

pytestmark = pytest.mark.slow  # creating the SQLite registry costs ~10 s on 2 cores


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One registry for the module (creating a SQLite store costs seconds) and a small good checkpoint."""
    import torch
    from mlflow.tracking import MlflowClient

    from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
    from lmadda.models import GeneratorConfig, UNetGenerator

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("cache-test", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model("lmadda-dapi")
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(in_channels=1, out_channels=2, ngf=2, depth=6))
    good = save_checkpoint(root / "good" / "generator.pt", GeneratorCheckpoint(generator=generator, markers=["dapi", "cd29"], setting="x"))
    return {"uri": uri, "client": client, "experiment": experiment, "good": Path(good)}


@pytest.fixture()
def registry(store, tmp_path):
    """A new version of lmadda-dapi whose stored generator is corrupt (a download cut short)."""
    client = store["client"]
    corrupt = tmp_path / "upload" / "generator.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a checkpoint: a download cut short")
    run = client.create_run(store["experiment"])
    client.log_artifact(run.info.run_id, str(corrupt), "generator")
    version = client.create_model_version("lmadda-dapi", f"runs:/{run.info.run_id}/generator/generator.pt", run_id=run.info.run_id)
    stored = Path(client.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://")) / "generator" / "generator.pt"
    assert stored.is_file()
    return {**store, "model_id": f"lmadda-dapi/{version.version}", "stored": stored}


def test_a_poisoned_cache_is_downloaded_again_once_the_registry_file_is_fixed(registry, tmp_path):
    from lmadda_serve.registry import StainModels

    models = StainModels(registry["uri"], tmp_path / "cache")
    with pytest.raises(LmaddaError, match="corrupt"):
        models.load(registry["model_id"])  # the corrupt file is now in the replica's cache
    registry["stored"].write_bytes(registry["good"].read_bytes())  # the operator fixes the registry's file
    checkpoint = models.load(registry["model_id"])
    assert checkpoint.markers == ["dapi", "cd29"]


def test_a_cached_file_that_changed_on_disk_is_detected_and_replaced(registry, tmp_path):
    from lmadda_serve.registry import StainModels

    registry["stored"].write_bytes(registry["good"].read_bytes())
    models = StainModels(registry["uri"], tmp_path / "cache")
    models.load(registry["model_id"])
    cached = next((tmp_path / "cache").rglob("generator.pt"))
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checkpoint might still load, with wrong weights
    cached.write_bytes(bytes(data))
    models.load(registry["model_id"])
    assert next((tmp_path / "cache").rglob("generator.pt")).read_bytes() == registry["good"].read_bytes()


def test_a_download_that_does_not_match_the_registered_sha256_is_refused(registry, tmp_path):
    from lmadda.core.registry_names import file_sha256
    from lmadda_serve.registry import StainModels

    registry["stored"].write_bytes(registry["good"].read_bytes())
    name, _, version = registry["model_id"].partition("/")
    registry["client"].set_model_version_tag(name, version, "sha256", "0" * 64)
    with pytest.raises(LmaddaError, match="differs from the registered"):
        StainModels(registry["uri"], tmp_path / "cache").load(registry["model_id"])
    registry["client"].set_model_version_tag(name, version, "sha256", file_sha256(registry["good"]))
    assert StainModels(registry["uri"], tmp_path / "cache").load(registry["model_id"]).markers == ["dapi", "cd29"]


def test_a_promoted_version_carries_its_sha256_and_a_tampered_file_is_never_served(store, tmp_path):
    """Promotion tags the version with the stored generator's SHA-256; the endpoint then refuses a
    store file swapped after promotion (a flipped byte may still load, with wrong weights), and a
    cached copy changed on disk is downloaded again and checked against the tag too."""
    from urllib.parse import unquote, urlparse

    from lmadda.core.registry_names import file_sha256
    from lmadda_serve.registry import StainModels
    from lmadda.sweep.promotion import _register, log_generator_model

    client = store["client"]
    run = client.create_run(store["experiment"])
    client.log_artifact(run.info.run_id, str(store["good"]), "generator")
    entry = _register(client, "dapi", "promoted", log_generator_model(client, run.info.run_id, "promoted"), {})
    version = client.get_model_version(entry["model"], entry["version"])
    assert version.tags["sha256"] == file_sha256(store["good"])
    model_id = f"{entry['model']}/{entry['version']}"

    models = StainModels(store["uri"], tmp_path / "cache")
    assert models.load(model_id).markers == ["dapi", "cd29"]
    # the file the version serves: the LoggedModel's copy of the run's generator
    stored = Path(unquote(urlparse(client.get_logged_model(entry["model_id"]).artifact_location).path)) / "generator.pt"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))  # the store's file swapped after promotion
    with pytest.raises(LmaddaError, match="differs from the registered"):
        StainModels(store["uri"], tmp_path / "fresh-cache").load(model_id)  # a new replica downloads it: refused
    cached = next((tmp_path / "cache").rglob("generator.pt"))
    cached.write_bytes(bytes(data))  # and the first replica's cached copy changed the same way
    with pytest.raises(LmaddaError, match="differs from the registered"):
        models.load(model_id)  # thrown away, downloaded again, refused: never served
    assert not (tmp_path / "cache" / "lmadda-dapi" / str(entry["version"])).exists()  # nothing left to serve from


def test_a_cached_file_swapped_with_its_record_rewritten_is_caught_by_the_registry_tag_at_the_next_load(store, tmp_path):
    """The attack of issue 26: the cached file replaced by a valid checkpoint with other weights, and the cache's
    own record rewritten to match. A restarted replica (a new StainModels) checks the registry's tag, not the record."""
    import json

    import torch

    from lmadda.checkpoint import load_checkpoint, save_checkpoint
    from lmadda.core.registry_names import file_sha256
    from lmadda_serve.registry import CACHE_RECORD, StainModels
    from lmadda.sweep.promotion import _register, log_generator_model

    client = store["client"]
    run = client.create_run(store["experiment"])
    client.log_artifact(run.info.run_id, str(store["good"]), "generator")
    entry = _register(client, "dapi", "swapped", log_generator_model(client, run.info.run_id, "swapped"), {})
    model_id = f"{entry['model']}/{entry['version']}"
    StainModels(store["uri"], tmp_path / "cache").load(model_id)
    cached = next((tmp_path / "cache").rglob("*.pt"))
    negated = load_checkpoint(cached)
    with torch.no_grad():
        for parameter in negated.generator.parameters():
            parameter.neg_()
    save_checkpoint(cached, negated)
    record_path = cached.parent / CACHE_RECORD
    while not record_path.exists():
        record_path = record_path.parent.parent / CACHE_RECORD
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "size": cached.stat().st_size, "sha256": file_sha256(cached)}))
    served = StainModels(store["uri"], tmp_path / "cache").load(model_id)
    good = load_checkpoint(store["good"])
    assert all(torch.equal(a, b) for a, b in zip(served.generator.state_dict().values(), good.generator.state_dict().values()))
    assert file_sha256(next((tmp_path / "cache").rglob("*.pt"))) == file_sha256(store["good"])


def test_the_cache_is_private_per_user_and_per_registry(store, tmp_path, monkeypatch):
    import os

    from lmadda_serve import registry as registry_module
    from lmadda_serve.registry import StainModels, default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lmadda" / "serve-models"  # never a shared /tmp path
    assert StainModels(store["uri"]).cache_dir.parent == default_cache_dir()
    assert (default_cache_dir().stat().st_mode & 0o777) == 0o700
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o777)
    open_folder.chmod(0o777)
    one, other = StainModels(store["uri"], open_folder), StainModels("sqlite:////elsewhere/mlflow.db", open_folder)
    assert (open_folder.stat().st_mode & 0o777) == 0o700  # closed to others
    assert one.cache_dir != other.cache_dir  # lmadda-dapi/1 of another registry never lands in this one's folder
    someone_else = os.getuid() + 1
    monkeypatch.setattr(registry_module.os, "getuid", lambda: someone_else)
    with pytest.raises(LmaddaError, match="belongs to uid"):
        StainModels(store["uri"], open_folder)
