"""ASHA's stopping decisions survive a study killed and resumed (issue 17, item 5).

Tune's own path is used for the restore: a ``Tuner`` built with the scheduler before any
result (as a search is), then ``Tuner.restore`` of its experiment folder, whose scheduler
Tune unpickles from ``tuner.pkl``. No Ray cluster is started: the results are fed to the
scheduler as Tune's controller feeds them, one trial after another (``--max-concurrent 1``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from semiseg.tune.scheduler import ResumableASHAScheduler, make_scheduler, scheduler_state_file
from semiseg.tune.study import Study

MAX_EPOCHS = 8
METRIC = "val/dice"
STUDY = Study(name="asha_state", description="ASHA on resume", grace_period=1, reduction_factor=2)
FINAL_DICE = [0.69, 0.24, 0.84, 0.36, 0.76, 0.3, 0.58, 0.26, 0.9, 0.81]
RISE_EPOCHS = [4, 0.5, 2, 2, 0.5, 2, 1, 2, 4, 0.5]
"""Trial i's Dice after e epochs is ``FINAL_DICE[i] * (1 - exp(-e / RISE_EPOCHS[i]))``: crossing curves."""
STOPPED_EARLY = {1: 2, 3: 1, 5: 1, 6: 4, 7: 1, 8: 2}
"""Trial → the epoch ASHA stops it at (rungs at 1, 2, 4 and 8 epochs), uninterrupted."""
STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def _dice(trial: int, epoch: int) -> float:
    return FINAL_DICE[trial] * (1 - math.exp(-epoch / RISE_EPOCHS[trial]))


def _train(config):
    """The trainable the Tuner is built with; never run here."""


class SearchDriver:
    """A search of ``FINAL_DICE`` trials run one after another, with Tune's restore on demand.

    Args:
        make: builds the scheduler (as ``_new_search`` does), given the study's folder.
        folder: the study's folder; Tune's experiment goes to ``folder / "ray"``.
    """

    def __init__(self, make: Callable[[Path], TrialScheduler], folder: Path) -> None:
        self.folder = folder
        self.scheduler = make(folder)
        tune.Tuner(_train, tune_config=tune.TuneConfig(scheduler=self.scheduler, metric=METRIC, mode="max"),
                   run_config=tune.RunConfig(name="search", storage_path=str(folder / "ray")))
        self.scheduler.set_search_properties(METRIC, "max")
        self.added: list[SimpleNamespace] = []
        self.created: list[SimpleNamespace] = []
        self.decisions: dict[tuple[int, int], list[str]] = {}

    def restore(self, lost: int = 0) -> None:
        """What ``--resume`` does: Tune restores the experiment and adds back every trial of its last
        snapshot, which lacks the ``lost`` trials created after it."""
        restored = tune.Tuner.restore(str(self.folder / "ray" / "search"), _train)
        self.scheduler = restored._local_tuner._tune_config.scheduler
        self.scheduler.set_search_properties(METRIC, "max")
        self.added = self.added[:len(self.added) - lost]
        for trial in reversed(self.added):
            self.scheduler.on_trial_add(None, trial)

    def start(self, index: int) -> SimpleNamespace:
        """A new trial of ``FINAL_DICE[index]`` (a new id when the configuration runs again)."""
        runs = sum(trial.index == index for trial in self.created)
        trial = SimpleNamespace(trial_id=f"trial_{index:05d}" + "_again" * runs, index=index)
        self.created.append(trial)
        self.added.append(trial)
        self.scheduler.on_trial_add(None, trial)
        return trial

    def run(self, kill_after: tuple[int, int] | None = None, lost: int = 0) -> dict[tuple[int, int], list[str]]:
        """Every decision per (trial, epoch).

        ``kill_after``: the driver dies right after deciding on that result, before Tune registered
        its checkpoint, so the trial resumes from the epoch before; with ``lost`` > 0 Tune's last
        snapshot lacks that many of the latest trials (this one included), which the search runs
        again from their first epoch, as a restored searcher suggests them again.
        """
        trial, epoch = self.start(0), 1
        while True:
            result = {"epoch": epoch, METRIC: _dice(trial.index, epoch)}
            action = self.scheduler.on_trial_result(None, trial, result)
            self.decisions.setdefault((trial.index, epoch), []).append(action)
            if kill_after == (trial.index, epoch):
                kill_after = None
                self.restore(lost)
                if lost:
                    trial, epoch = self.start(trial.index - lost + 1), 1
                continue
            if action == STOP:
                self.scheduler.on_trial_complete(None, trial, result)
                if trial.index + 1 == len(FINAL_DICE):
                    return self.decisions
                trial, epoch = self.start(trial.index + 1), 1
                continue
            epoch += 1


def _resumable(folder: Path) -> TrialScheduler:
    return make_scheduler(STUDY, folder, "search-mean_teacher", MAX_EPOCHS)


def _plain_asha(folder: Path) -> TrialScheduler:
    return ASHAScheduler(time_attr="epoch", max_t=MAX_EPOCHS, grace_period=STUDY.grace_period,
                         reduction_factor=STUDY.reduction_factor)


def _stopped_early(decisions: dict[tuple[int, int], list[str]]) -> dict[int, int]:
    return {trial: epoch for (trial, epoch), actions in decisions.items() if STOP in actions and epoch < MAX_EPOCHS}


def _kill_points(tmp_path: Path) -> list[tuple[int, int]]:
    return sorted(SearchDriver(_resumable, tmp_path / "points").run())


def test_the_uninterrupted_search_stops_trials_at_several_rungs(tmp_path):
    decisions = SearchDriver(_resumable, tmp_path).run()
    assert _stopped_early(decisions) == STOPPED_EARLY
    assert all(len(actions) == 1 for actions in decisions.values())


@pytest.mark.parametrize("lost", [0, 1, 2])
def test_a_search_killed_anywhere_and_resumed_makes_the_uninterrupted_decisions(tmp_path, lost):
    """``lost``: trials created after Tune's last snapshot (1: the running one; 2: also the one before)."""
    uninterrupted = SearchDriver(_resumable, tmp_path / "whole").run()
    for kill_after in [point for point in _kill_points(tmp_path) if point[0] >= lost - 1]:
        resumed = SearchDriver(_resumable, tmp_path / f"killed-{kill_after[0]}-{kill_after[1]}").run(kill_after, lost)
        assert set(resumed) == set(uninterrupted), f"killed after {kill_after}: other results were decided on"
        for key, actions in resumed.items():
            assert set(actions) == set(uninterrupted[key]), f"killed after {kill_after}: {key} got {actions}"


def test_ray_asha_forgets_its_rungs_on_restore(tmp_path):
    """Ray's own ASHA, restored the same way, decides differently: what the state file fixes.

    Should Ray start saving its scheduler, this fails and ``ResumableASHAScheduler`` can go.
    """
    uninterrupted = _stopped_early(SearchDriver(_plain_asha, tmp_path / "whole").run())
    assert uninterrupted == STOPPED_EARLY
    differing = [kill_after for kill_after in _kill_points(tmp_path)
                 if _stopped_early(SearchDriver(_plain_asha, tmp_path / f"k{kill_after}").run(kill_after))
                 != uninterrupted]
    assert len(differing) > len(FINAL_DICE), differing
    resumed = SearchDriver(_plain_asha, tmp_path / "after-first-trial").run(kill_after=(1, 1))
    assert _stopped_early(resumed) != uninterrupted


def test_a_trial_stopped_just_before_the_kill_is_stopped_again_at_that_epoch(tmp_path):
    driver = SearchDriver(_resumable, tmp_path)
    decisions = driver.run(kill_after=(6, 4))
    assert decisions[(6, 4)] == [STOP, STOP], "the trial resumed from epoch 3 and reported epoch 4 again"
    assert (6, 5) not in decisions


def test_the_state_file_holds_the_rungs_and_the_stopped_trials(tmp_path):
    SearchDriver(_resumable, tmp_path).run()
    state = json.loads(scheduler_state_file(tmp_path, "search-mean_teacher").read_text())
    ((milestones), ) = [[milestone for milestone, _ in bracket] for bracket in state["rungs"]]
    assert milestones == [8.0, 4.0, 2.0, 1.0]
    first_rung = state["rungs"][0][-1][1]
    assert first_rung == {f"trial_{i:05d}": pytest.approx(_dice(i, 1)) for i in range(len(FINAL_DICE))}
    assert state["stopped_at"] == {f"trial_{i:05d}": float(STOPPED_EARLY.get(i, MAX_EPOCHS))
                                   for i in range(len(FINAL_DICE))}
    assert state["num_stopped"] == len(FINAL_DICE)


def test_a_new_search_starts_from_empty_rungs_whatever_an_earlier_run_left(tmp_path):
    SearchDriver(_resumable, tmp_path).run()
    fresh = make_scheduler(STUDY, tmp_path, "search-mean_teacher", MAX_EPOCHS)
    assert all(not recorded for bracket in fresh._brackets for _, recorded in bracket._rungs)
    state = json.loads(scheduler_state_file(tmp_path, "search-mean_teacher").read_text())
    assert state["stopped_at"] == {} and all(not recorded for _, recorded in state["rungs"][0])


def test_a_restore_without_its_state_file_warns_and_starts_empty(tmp_path, caplog):
    driver = SearchDriver(_resumable, tmp_path)
    driver.run()
    scheduler_state_file(tmp_path, "search-mean_teacher").unlink()
    driver.restore()
    assert isinstance(driver.scheduler, ResumableASHAScheduler)
    assert all(not recorded for bracket in driver.scheduler._brackets for _, recorded in bracket._rungs)
    assert "no ASHA state at" in caplog.text and "starts from empty rungs" in caplog.text


def test_the_records_of_trials_lost_with_the_driver_are_dropped(tmp_path):
    """Trials 5 and 6 ran after Tune's last snapshot: the search runs them again under new ids,
    and each counts once in the rungs, as in the uninterrupted search."""
    driver = SearchDriver(_resumable, tmp_path)
    decisions = driver.run(kill_after=(6, 4), lost=2)
    assert _stopped_early(decisions) == STOPPED_EARLY
    state = json.loads(scheduler_state_file(tmp_path, "search-mean_teacher").read_text())
    first_rung = state["rungs"][0][-1][1]
    assert sorted(first_rung) == sorted(["trial_00005_again", "trial_00006_again",
                                         *(f"trial_{i:05d}" for i in range(len(FINAL_DICE)) if i not in (5, 6))])
    assert "trial_00006" not in state["stopped_at"] and state["stopped_at"]["trial_00006_again"] == 4.0
