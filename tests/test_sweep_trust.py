"""Resuming a sweep unpickles its storage folder, so a folder that someone else can write is refused (issue 26, hole 5);
and a sweep, like every command, does not write over its inputs (hole 6).

No Ray is started: the refusal comes before any work."""

from __future__ import annotations

import os
import pickle

import pytest
import yaml

from lmadda.cli import main
from lmadda.core.errors import LmaddaError


class _Payload:
    """What a planted tuner.pkl does when it is unpickled: here, make a folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _sweep_folder(tmp_path, *, storage=0o700, experiment=0o700, tuner=0o600):
    storage_path = tmp_path / "sweeps"
    experiment_path = storage_path / "s"
    experiment_path.mkdir(parents=True)
    (experiment_path / "tuner.pkl").write_bytes(pickle.dumps(_Payload(tmp_path / "payload-ran")))
    (experiment_path / "tuner.pkl").chmod(tuner)
    experiment_path.chmod(experiment)
    storage_path.chmod(storage)
    return experiment_path, storage_path


def test_a_folder_only_its_owner_can_write_is_trusted(tmp_path):
    from lmadda_tune.sweep import refuse_untrusted_restore

    refuse_untrusted_restore(*_sweep_folder(tmp_path))
    refuse_untrusted_restore(tmp_path / "none" / "s", tmp_path / "none")  # nothing there: nothing to restore, nothing refused


@pytest.mark.parametrize("modes, culprit, problem", [
    ({"experiment": 0o770}, "sweeps/s", "is group-writable (mode 0770)"),
    ({"storage": 0o777}, "sweeps", "is group- and world-writable (mode 0777)"),
    ({"tuner": 0o602}, "sweeps/s/tuner.pkl", "is world-writable (mode 0602)"),
])
def test_a_group_or_world_writable_folder_or_tuner_pkl_is_refused_in_one_line(tmp_path, modes, culprit, problem):
    from lmadda_tune.sweep import refuse_untrusted_restore

    experiment_path, storage_path = _sweep_folder(tmp_path, **modes)
    with pytest.raises(LmaddaError) as caught:
        refuse_untrusted_restore(experiment_path, storage_path)
    message = str(caught.value)
    assert f"{tmp_path / culprit} {problem}" in message
    assert f"chmod go-w {tmp_path / culprit}" in message and "start a fresh sweep in a folder you own" in message
    assert "\n" not in message
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_folder_another_user_owns_is_refused(tmp_path):
    from lmadda_tune.sweep import refuse_untrusted_restore

    experiment_path, storage_path = _sweep_folder(tmp_path)
    os.chown(experiment_path, 65534, 65534)
    with pytest.raises(LmaddaError, match=r"sweeps/s is owned by .*uid 65534.*, not by you .*start a fresh sweep in a folder you own"):
        refuse_untrusted_restore(experiment_path, storage_path)


@pytest.mark.parametrize("flag", ["--resume", "--reuse"])
def test_sweep_run_refuses_to_resume_from_a_world_writable_folder_before_unpickling_anything(tmp_path, monkeypatch, capsys, flag):
    import ray

    from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
    from lmadda.models import GeneratorConfig, UNetGenerator

    experiment_path, _ = _sweep_folder(tmp_path, experiment=0o777)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3, out_channels=1)).eval()
    save_checkpoint(tmp_path / "src.pt", GeneratorCheckpoint(generator=generator, markers=["dapi"], setting="phase_contrast"))
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "s", "storage_path": str(tmp_path / "sweeps"), "source": {"checkpoint": str(tmp_path / "src.pt")},
        "data": {"manifest": str(tmp_path / "m.parquet")},
        "grid": {"targets": ["bright_field"], "layers": [0], "lrs": [1e-4], "paper_layers": []},
    }))
    # No Ray is started, and none is needed to show the hole: Tuner.restore unpickles tuner.pkl before it needs Ray.
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    try:
        code = main(["sweep", "run", "--config", str(config), flag])
    except Exception as error:  # without the check, Tune's restore runs the payload and then fails on it
        code = error
    error = capsys.readouterr().err
    assert not (tmp_path / "payload-ran").exists()
    assert code == 2
    assert error.strip().splitlines() == [error.strip()]
    assert error.startswith(f"lmadda: error: refusing to resume the sweep from {experiment_path}: {experiment_path} is "
                            "group- and world-writable (mode 0777)")


def test_sweep_run_refuses_a_config_whose_results_table_is_its_manifest(tiny_synth, tmp_path, monkeypatch, capsys):
    import ray

    manifest = tiny_synth.save(tmp_path / "sweeps" / "s" / "results.parquet")
    before = manifest.read_bytes()
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "s", "storage_path": str(tmp_path / "sweeps"), "source": {"checkpoint": str(tmp_path / "src.pt")},
        "data": {"manifest": str(manifest)},
        "grid": {"targets": ["bright_field"], "layers": [0], "lrs": [1e-4], "paper_layers": []},
    }))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no Ray: the refusal comes before it is needed
    code = main(["sweep", "run", "--config", str(config)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith(f"lmadda: error: the sweep's results table {manifest} would overwrite the input data.manifest {manifest}; "
                            "change storage_path, name or source.checkpoint in the sweep config")
    assert manifest.read_bytes() == before
