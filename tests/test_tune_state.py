"""A sweep driver killed while Ray Tune writes its state resumes from the last complete state (lmadda_tune.tune_state).

No Ray is started: the files are Tune's, written here as Tune writes them. test_ray_integration kills a real driver
and cuts its state before resuming."""

from __future__ import annotations

import json
import os
import pickle
from types import SimpleNamespace

import pytest

from lmadda.core.errors import LmaddaError
from lmadda_tune.tune_state import BACKUP_DIR, SET_ASIDE, StateBackup, recover_tune_state, sessions, state_problem

OLD, NEW = "2026-12-07_15-42-43", "2026-12-07_16-00-00"


def _session(folder, session, trials: int):
    """One driver session's pair: the trial table and the grid generator's state, whose counter says what it handed out."""
    folder.mkdir(exist_ok=True)
    state = folder / f"experiment_state-{session}.json"
    state.write_text(json.dumps({"trial_data": [[f"trial {i}", {}] for i in range(trials)], "runner_data": {}}))
    searcher = folder / f"basic-variant-state-{session}.json"
    searcher.write_bytes(pickle.dumps({"counter": trials}))
    return state, searcher


def _trials(folder):
    return [SimpleNamespace(storage=SimpleNamespace(experiment_fs_path=str(folder)))]


def test_a_state_file_is_complete_only_when_it_parses_or_runs_to_the_pickles_stop(tmp_path):
    state, searcher = _session(tmp_path / "sweep", OLD, 2)
    assert state_problem(state.name, state.read_bytes()) is None and state_problem(searcher.name, searcher.read_bytes()) is None
    assert "cut off" in state_problem(state.name, state.read_bytes()[:20])
    assert state_problem(state.name, b"") == "it is empty"
    data = searcher.read_bytes()
    assert "cut off" in state_problem(searcher.name, data[:-1])
    assert "cut off" in state_problem(searcher.name, data[:len(data) // 2] + b".")  # ends like a pickle, but is not whole


def test_the_backup_keeps_the_last_complete_pair_and_skips_one_being_written(tmp_path):
    folder = tmp_path / "sweep"
    state, searcher = _session(folder, OLD, 1)
    backup = StateBackup()
    backup.on_step_end(0, _trials(folder))
    assert (folder / BACKUP_DIR / state.name).read_bytes() == state.read_bytes()
    assert (folder / BACKUP_DIR / searcher.name).read_bytes() == searcher.read_bytes()
    kept = {path.name: path.read_bytes() for path in (state, searcher)}
    _session(folder, OLD, 2)
    state.write_text('{"trial_data": [["trial 0", {}], ["tri')  # Tune's copy is writing it right now
    backup.on_step_end(1, _trials(folder))
    assert {name: (folder / BACKUP_DIR / name).read_bytes() for name in kept} == kept  # neither file of the pair moved
    backup.on_step_end(2, [])  # no trials yet: nothing to keep, nothing fails


def test_a_cut_state_is_put_back_as_a_whole_pair_from_its_copy(tmp_path):
    folder = tmp_path / "sweep"
    state, searcher = _session(folder, OLD, 1)
    StateBackup().on_experiment_end(_trials(folder))
    copied = {path.name: path.read_bytes() for path in (state, searcher)}
    _session(folder, OLD, 2)  # the generator has handed out a second trial since the copy...
    state.write_bytes(b"")  # ...and the driver was killed while the trial table was written
    said = []
    recover_tune_state(folder, said.append)
    # the trial table and the generator of one moment: a newer generator beside the older table would skip a trial
    assert {path.name: path.read_bytes() for path in (state, searcher)} == copied
    assert "not complete" in said[0] and state.name in said[0]
    assert (folder / BACKUP_DIR / SET_ASIDE / state.name).read_bytes() == b""  # the cut file is kept aside, not lost
    said.clear()
    recover_tune_state(folder, said.append)  # a complete state is left as it is
    assert said == [] and {path.name: path.read_bytes() for path in (state, searcher)} == copied


def test_a_resumed_session_cut_before_its_first_copy_falls_back_to_the_previous_session(tmp_path):
    folder = tmp_path / "sweep"
    _session(folder, OLD, 2)
    StateBackup().on_experiment_end(_trials(folder))
    state, searcher = _session(folder, NEW, 3)  # the resumed driver's own session, killed mid-write before any copy
    state.write_bytes(state.read_bytes()[:10])
    said = []
    recover_tune_state(folder, said.append)
    assert sessions(folder) == [OLD] and f"session {OLD}" in said[0]
    assert sorted(path.name for path in (folder / BACKUP_DIR / SET_ASIDE).iterdir()) == sorted([state.name, searcher.name])


def test_a_cut_state_without_a_copy_is_refused_in_one_line_and_left_as_it_was(tmp_path):
    folder = tmp_path / "sweep"
    state, _ = _session(folder, OLD, 2)
    state.write_bytes(state.read_bytes()[:30])
    before = state.read_bytes()
    with pytest.raises(LmaddaError) as refused:
        recover_tune_state(folder, print)
    message = str(refused.value)
    assert state.name in message and "killed while it was written" in message and "new name" in message
    assert "\n" not in message
    assert state.read_bytes() == before  # nothing written over


def test_a_cut_copy_is_not_put_back(tmp_path):
    folder = tmp_path / "sweep"
    state, _ = _session(folder, OLD, 2)
    StateBackup().on_experiment_end(_trials(folder))
    (folder / BACKUP_DIR / state.name).write_bytes(b"{")
    state.write_bytes(b"")
    with pytest.raises(LmaddaError, match="no complete copy"):
        recover_tune_state(folder, print)


def test_resuming_refuses_a_state_copy_someone_else_can_write(tmp_path):
    from lmadda_tune.sweep import refuse_untrusted_restore

    storage = tmp_path / "sweeps"
    folder = storage / "sweep"
    storage.mkdir(mode=0o700)
    _session(folder, OLD, 1)
    os.chmod(folder, 0o700)
    StateBackup().on_experiment_end(_trials(folder))
    refuse_untrusted_restore(folder, storage)  # all the user's own: fine
    planted = folder / BACKUP_DIR / f"basic-variant-state-{OLD}.json"
    os.chmod(planted, 0o666)
    with pytest.raises(LmaddaError, match="world-writable"):
        refuse_untrusted_restore(folder, storage)
