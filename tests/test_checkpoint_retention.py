"""Old checkpoints are deleted only once no saved experiment state can name them."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune import Checkpoint

from semiseg.tune.retention import CheckpointRetention


def _register(retention, trial, folder, index):
    path = folder / f"checkpoint_{index:06d}"
    path.mkdir()
    retention.on_checkpoint(0, [], trial, Checkpoint.from_directory(str(path)))


def _left(folder):
    return sorted(int(p.name.split("_")[1]) for p in folder.iterdir())


def test_checkpoints_named_by_the_last_saved_state_survive_until_a_newer_state_is_saved(tmp_path):
    trial = SimpleNamespace(trial_id="t0")
    retention = CheckpointRetention(keep=2)
    for index in range(4):
        _register(retention, trial, tmp_path, index)
    retention.get_state()
    assert _left(tmp_path) == [0, 1, 2, 3], "no state was saved before: nothing may go"
    for index in range(4, 7):
        _register(retention, trial, tmp_path, index)
    assert _left(tmp_path) == list(range(7)), "registering a checkpoint deletes nothing"
    retention.get_state()
    assert _left(tmp_path) == [3, 4, 5, 6], "the previous state named checkpoint 3: it and newer ones stay"
    retention.get_state()
    assert _left(tmp_path) == [5, 6], "the newest two are always kept"


def test_trials_are_pruned_independently_and_a_missing_folder_is_no_error(tmp_path):
    retention = CheckpointRetention(keep=1)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    for index in range(3):
        _register(retention, SimpleNamespace(trial_id="a"), tmp_path / "a", index)
    _register(retention, SimpleNamespace(trial_id="b"), tmp_path / "b", 0)
    retention.get_state()
    _register(retention, SimpleNamespace(trial_id="a"), tmp_path / "a", 3)
    (tmp_path / "a" / "checkpoint_000000").rmdir()
    retention.get_state()
    assert _left(tmp_path / "a") == [2, 3] and _left(tmp_path / "b") == [0]
