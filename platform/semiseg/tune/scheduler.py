"""ASHA whose rung records survive a resumed study.

Ray Tune 2.60 never saves a scheduler's state with its experiment snapshots (the
``TuneController`` saves the trials, the searcher and the callbacks; it calls neither
``TrialScheduler.save`` nor ``restore``). ``Tuner.restore`` takes the scheduler back from
``tuner.pkl``, which ``Tuner`` writes once, when it is constructed: an ASHA with empty rungs.
A resumed search then compares its trials against nothing and stops none of them at the rungs
the earlier trials had filled.

:class:`ResumableASHAScheduler` keeps its rungs, the trials it stopped and their brackets in a
JSON file of the study's folder, written atomically whenever they change, and reads it back
when Tune unpickles it from ``tuner.pkl``. A decision once made is kept: a trial that resumes
from a checkpoint older than the epoch at which it was stopped is stopped again there (its
records are already in the rungs, where plain ASHA would let it continue). A trial started
after Tune's last snapshot dies with the driver and the resumed search runs its configuration
again under a new id: the records of a trial Tune does not bring back are dropped, so that no
trial counts twice in a rung.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from semiseg.tracking import METRIC_EPOCH
from semiseg.tune.study import Study

log = logging.getLogger(__name__)
STATE_FOLDER = "asha"
STATE_VERSION = 1


def scheduler_state_file(study_dir: Path, phase: str) -> Path:
    """Where the ASHA state of ``phase`` lives in the study's folder."""
    return Path(study_dir) / STATE_FOLDER / f"{phase}.json"


def make_scheduler(study: Study, study_dir: Path, phase: str, max_epochs: int) -> "ResumableASHAScheduler":
    """The ASHA scheduler of a new search of ``phase``: on the trials' ``epoch``, its state in ``study_dir``.

    Call it for a new search only: it starts from empty rungs and overwrites the state an
    earlier run of the phase left. A restored ``Tuner`` brings its scheduler back from
    ``tuner.pkl``, and that scheduler reads the state this one kept.
    """
    return ResumableASHAScheduler(scheduler_state_file(study_dir, phase), time_attr=METRIC_EPOCH, max_t=max_epochs,
                                  grace_period=min(study.grace_period, max_epochs),
                                  reduction_factor=study.reduction_factor)


class ResumableASHAScheduler(AsyncHyperBandScheduler):
    """:class:`AsyncHyperBandScheduler` whose decisions survive ``Tuner.restore``.

    Args:
        state_file: the JSON file that keeps the rungs, the stopped trials and the brackets.
        **asha: passed to :class:`AsyncHyperBandScheduler`.
    """

    def __init__(self, state_file: Path, **asha: Any) -> None:
        super().__init__(**asha)
        self.state_file = Path(state_file)
        self._stopped_at: dict[str, float] = {}
        self._bracket_of: dict[str, int] = {}
        self._restored_trials: set[str] = set()
        """After a restore, the trials kept in the state that Tune has not added back yet."""
        self._saved = ""
        self._save()

    def __setstate__(self, state: dict) -> None:
        """Unpickled (``Tuner.restore`` reads ``tuner.pkl``): take back the state kept in the file."""
        self.__dict__.update(state)
        self._load()
        self._restored_trials = set(self._bracket_of)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        """Put a trial in its bracket: the one it had before a restore, else ASHA's draw."""
        self._restored_trials.discard(trial.trial_id)
        index = self._bracket_of.get(trial.trial_id)
        if index is None:
            super().on_trial_add(tune_controller, trial)
            self._bracket_of[trial.trial_id] = self._brackets.index(self._trial_info[trial.trial_id])
            self._save()
        else:
            self._trial_info[trial.trial_id] = self._brackets[index]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """ASHA's decision; STOP again for a result at or past the epoch where the trial was stopped."""
        self._forget_lost_trials()
        stopped_at = self._stopped_at.get(trial.trial_id)
        if stopped_at is not None and result.get(self._time_attr, -math.inf) >= stopped_at:
            return TrialScheduler.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self._stopped_at[trial.trial_id] = float(result[self._time_attr])
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        """ASHA records the trial's last result; the rungs are saved."""
        self._forget_lost_trials()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def _forget_lost_trials(self) -> None:
        """Drop what is kept of the trials Tune did not bring back with the restore.

        Tune adds every trial of its snapshot back while it resumes, before any result: at the
        first result, a kept trial not added back died with the driver.
        """
        if not self._restored_trials:
            return
        for bracket in self._brackets:
            for _, recorded in bracket._rungs:
                for trial_id in self._restored_trials:
                    recorded.pop(trial_id, None)
        for trial_id in self._restored_trials:
            self._stopped_at.pop(trial_id, None)
            self._bracket_of.pop(trial_id, None)
        log.info("ASHA forgets %d trial(s) lost with the driver: %s", len(self._restored_trials),
                 ", ".join(sorted(self._restored_trials)))
        self._restored_trials = set()
        self._save()

    def _state(self) -> dict:
        return {"version": STATE_VERSION,
                "rungs": [[[float(milestone), {trial: float(value) for trial, value in recorded.items()}]
                           for milestone, recorded in bracket._rungs] for bracket in self._brackets],
                "stopped_at": self._stopped_at, "bracket_of": self._bracket_of, "num_stopped": self._num_stopped}

    def _save(self) -> None:
        """Write the state atomically when it changed since the last write."""
        text = json.dumps(self._state(), sort_keys=True)
        if text == self._saved:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.state_file)
        self._saved = text

    def _load(self) -> None:
        """Refill the rungs from the state file (kept empty, with a warning, when it does not fit)."""
        if not self.state_file.exists():
            log.warning("no ASHA state at %s: the resumed search starts from empty rungs", self.state_file)
            return
        state = json.loads(self.state_file.read_text())
        milestones = [[milestone for milestone, _ in bracket] for bracket in state.get("rungs", [])]
        expected = [[float(milestone) for milestone, _ in bracket._rungs] for bracket in self._brackets]
        if state.get("version") != STATE_VERSION or milestones != expected:
            log.warning("the ASHA state at %s has other rungs (%s, expected %s): the resumed search starts from "
                        "empty rungs", self.state_file, milestones, expected)
            return
        for bracket, rungs in zip(self._brackets, state["rungs"]):
            for (_, recorded), (_, saved) in zip(bracket._rungs, rungs):
                recorded.clear()
                recorded.update(saved)
        self._stopped_at = dict(state["stopped_at"])
        self._bracket_of = {trial: int(index) for trial, index in state["bracket_of"].items()}
        self._num_stopped = int(state["num_stopped"])
        self._saved = json.dumps(self._state(), sort_keys=True)
