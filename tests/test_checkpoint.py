import pytest
import torch

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint, save_checkpoint
from lmadda.core.errors import LmaddaError
from lmadda.data.normalise import NormalisationParams
from lmadda.models import GeneratorConfig, UNetGenerator


def _checkpoint():
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=4, out_channels=2)).eval()
    return GeneratorCheckpoint(generator=generator, markers=["dapi", "cd29"], setting="phase_contrast",
                               target_norm=NormalisationParams((600.0, 700.0), (20000.0, 9000.0)),
                               metadata={"method": "source", "best_val_pearson": 0.7})


def test_checkpoint_round_trip_keeps_weights_and_description(tmp_path):
    original = _checkpoint()
    path = save_checkpoint(tmp_path / "g.pt", original)
    loaded = load_checkpoint(path)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.generator(x), original.generator(x))
    assert loaded.markers == ["dapi", "cd29"] and loaded.setting == "phase_contrast"
    assert loaded.target_norm == original.target_norm and loaded.metadata["best_val_pearson"] == 0.7
    assert loaded.config == original.config and not loaded.generator.training


def test_corrupt_foreign_and_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(LmaddaError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LmaddaError, match="corrupt or not a PyTorch file"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(LmaddaError, match="not an lmadda generator checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    good = save_checkpoint(tmp_path / "good.pt", _checkpoint())
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LmaddaError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


def test_weights_that_do_not_fit_the_config_are_reported(tmp_path):
    path = save_checkpoint(tmp_path / "g.pt", _checkpoint())
    payload = torch.load(path, weights_only=True)
    payload["generator_config"]["ngf"] = 8
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(LmaddaError, match="weights do not fit its generator config"):
        load_checkpoint(tmp_path / "bad.pt")


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "g.pt", _checkpoint())
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(LmaddaError, match="cannot write .*disk full"):  # one line for the user, not a traceback
        save_checkpoint(path, _checkpoint())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.pt"]  # no partial file left beside it
