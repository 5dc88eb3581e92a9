"""A sweep driver killed while Ray Tune writes its state resumes from the last complete copy (lmadda_tune.tune_state).

No Ray is started: the files are Tune's, written here as Tune writes them. test_ray_integration kills a real driver
and cuts its state before resuming."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest

from lmadda.core.errors import LmaddaError
from lmadda_tune.tune_state import BACKUP_DIR, StateBackup, recover_tune_state, state_problem

SESSION = "2026-12-07_15-42-43"


def _experiment(tmp_path, trials: int = 2):
    folder = tmp_path / "sweep"
    folder.mkdir()
    state = folder / f"experiment_state-{SESSION}.json"
    state.write_text(json.dumps({"trial_data": [[f"trial {i}", {}] for i in range(trials)], "runner_data": {}}))
    searcher = folder / f"basic-variant-state-{SESSION}.json"
    searcher.write_bytes(pickle.dumps({"counter": trials}))
    return folder, state, searcher


def _trials(folder):
    return [SimpleNamespace(storage=SimpleNamespace(experiment_fs_path=str(folder)))]


def test_a_state_file_is_complete_only_when_it_parses_or_ends_as_a_pickle(tmp_path):
    folder, state, searcher = _experiment(tmp_path)
    assert state_problem(state) is None and state_problem(searcher) is None
    state.write_bytes(state.read_bytes()[:20])
    assert "cut off" in state_problem(state)
    state.write_bytes(b"")
    assert state_problem(state) == "it is empty"
    searcher.write_bytes(searcher.read_bytes()[:-1])
    assert state_problem(searcher) == "it is cut off"


def test_the_backup_keeps_the_last_complete_state_and_skips_one_being_written(tmp_path):
    folder, state, searcher = _experiment(tmp_path, trials=1)
    backup = StateBackup()
    backup.on_step_end(0, _trials(folder))
    assert (folder / BACKUP_DIR / state.name).read_bytes() == state.read_bytes()
    assert (folder / BACKUP_DIR / searcher.name).read_bytes() == searcher.read_bytes()
    complete = state.read_bytes()
    state.write_text('{"trial_data": [["trial 0", {}], ["tri')  # Tune is writing it right now
    backup.on_step_end(1, _trials(folder))
    assert (folder / BACKUP_DIR / state.name).read_bytes() == complete
    backup.on_step_end(2, [])  # no trials yet: nothing to keep, nothing fails


def test_a_cut_state_is_put_back_from_its_last_complete_copy(tmp_path):
    folder, state, searcher = _experiment(tmp_path)
    StateBackup().on_experiment_end(_trials(folder))
    complete = state.read_bytes()
    state.write_bytes(b"")  # the driver was killed between Tune's open and its dump
    said = []
    recover_tune_state(folder, said.append)
    assert state.read_bytes() == complete and state_problem(state) is None
    assert "not complete" in said[0] and state.name in said[0]
    said.clear()
    recover_tune_state(folder, said.append)  # a complete state is left as it is
    assert said == [] and state.read_bytes() == complete


def test_a_cut_state_without_a_copy_is_refused_in_one_line(tmp_path):
    folder, state, _ = _experiment(tmp_path)
    state.write_bytes(state.read_bytes()[:30])
    with pytest.raises(LmaddaError) as refused:
        recover_tune_state(folder, print)
    message = str(refused.value)
    assert state.name in message and "killed while Tune was writing it" in message and "new name" in message
    assert "\n" not in message
    assert state.read_bytes()  # nothing written over


def test_a_cut_copy_is_not_put_back(tmp_path):
    folder, state, _ = _experiment(tmp_path)
    StateBackup().on_experiment_end(_trials(folder))
    (folder / BACKUP_DIR / state.name).write_bytes(b"{")
    state.write_bytes(b"")
    with pytest.raises(LmaddaError, match="no complete copy"):
        recover_tune_state(folder, print)
