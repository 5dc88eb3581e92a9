"""Resume states: one versioned, plain-data format, loaded with weights_only=True; a resumed loop goes on exactly
where it stopped; an old or foreign state is refused with a clear error and never unpickled."""

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from lmadda.checkpoint import LOOP_STATE_FORMAT, load_loop_state, save_loop_state
from lmadda.core.errors import LmaddaError
from lmadda.training.adapt import Adapter
from test_adapt import _config, _images, _source


def _adapter(steps: int = 8) -> Adapter:
    # log_every 3 with a save after step 4: the state holds partial sums between two logs
    return Adapter(_source(), _images(0.0), _images(1.0, seed=1), _config(steps=steps, log_every=3, d_warmup_steps=1))


def test_an_adapter_resumed_from_its_saved_state_takes_the_same_next_steps_as_one_never_interrupted(tmp_path):
    uninterrupted = _adapter()
    records = [uninterrupted.step() for _ in range(8)]

    interrupted = _adapter()
    for _ in range(4):
        interrupted.step()
    path = save_loop_state(tmp_path / "adapter_state.pt", "adapter", interrupted.state_dict(), {"point": "L2"})
    del interrupted
    saved = torch.load(path, map_location="cpu", weights_only=True)  # plain data: the safe load takes it as it is
    assert saved["format"] == LOOP_STATE_FORMAT and saved["format_version"] == 1 and saved["loop"] == "adapter"

    resumed = _adapter()
    loaded = load_loop_state(path, "adapter")
    assert loaded.metadata == {"point": "L2"}
    resumed.load_state_dict(loaded.state)
    assert [resumed.step() for _ in range(4)] == records[4:]  # same losses, accuracies, gate decisions, logs
    for name, weight in uninterrupted.target_generator.state_dict().items():
        assert torch.equal(weight, resumed.target_generator.state_dict()[name]), name
    assert resumed.finish().history == uninterrupted.finish().history


def test_plain_data_round_trips_numpy_paths_and_module_state_versions(tmp_path):
    module = torch.nn.BatchNorm2d(3)
    state = {"bn": module.state_dict(), "array": np.arange(4, dtype=np.float32), "scalar": np.float64(0.5), "where": Path("/x/y"),
             "pair": (1, 2.5), "nested": [{"ok": True, "none": None}], "numpy_rng": np.random.default_rng(0).bit_generator.state}
    loaded = load_loop_state(save_loop_state(tmp_path / "s.pt", "source", state), "source").state
    assert isinstance(loaded["bn"], OrderedDict) and loaded["bn"]._metadata == module.state_dict()._metadata
    assert torch.equal(loaded["array"], torch.arange(4, dtype=torch.float32))
    assert loaded["scalar"] == 0.5 and loaded["where"] == "/x/y" and loaded["pair"] == (1, 2.5) and loaded["nested"] == [{"ok": True, "none": None}]
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded["numpy_rng"]  # numpy's generator state is plain data already
    assert restored.random() == np.random.default_rng(0).random()


def test_a_state_that_holds_an_object_is_refused_when_saved_naming_where_it_sits(tmp_path):
    with pytest.raises(LmaddaError, match=r"state\['history'\]\[0\]\['when'\] is a builtins.object"):
        save_loop_state(tmp_path / "s.pt", "adapter", {"history": [{"when": object()}]})
    assert not (tmp_path / "s.pt").exists()


class WritesAFile:
    """What a malicious or merely old pickle can do on load: run code (here, write a file)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "code ran"))


@pytest.mark.parametrize("write", ["torch.save", "pickle.dump"])
def test_a_foreign_pickle_is_refused_with_a_clear_error_and_runs_nothing(tmp_path, write):
    marker = tmp_path / "ran.txt"
    payload = {"format": LOOP_STATE_FORMAT, "format_version": 1, "loop": "adapter", "state": {"step": WritesAFile(marker)}}
    path = tmp_path / "adapter_state.pt"
    if write == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(LmaddaError, match=r"cannot be loaded safely.*it was not unpickled\. Rerun it without --resume"):
        load_loop_state(path, "adapter")
    assert not marker.exists()


def test_a_state_written_before_states_were_versioned_says_to_rerun_without_resume(tmp_path):
    path = tmp_path / "adapter_state.pt"
    torch.save(_adapter(4).state_dict(), path)  # what lmadda wrote before: the bare state dict
    with pytest.raises(LmaddaError, match=r"no format='lmadda-loop-state' marker: it was written by an older lmadda.*without --resume"):
        load_loop_state(path, "adapter")


def test_an_unknown_version_or_another_loops_state_is_refused(tmp_path):
    path = save_loop_state(tmp_path / "s.pt", "adapter", {"step": 1})
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format_version": 2}, path)
    with pytest.raises(LmaddaError, match="format version 2 .* reads versions 1 to 1"):
        load_loop_state(path, "adapter")
    source_state = save_loop_state(tmp_path / "source.pt", "source", {"epoch": 1})
    with pytest.raises(LmaddaError, match="is the 'source' loop's state, not the 'adapter' loop's"):
        load_loop_state(source_state, "adapter")
    with pytest.raises(LmaddaError, match="not found"):
        load_loop_state(tmp_path / "missing.pt", "adapter")
