"""Optuna search that tells Optuna the truth about trials ASHA stopped.

Ray's ``OptunaSearch`` reports intermediate values at Tune's ``training_iteration``
(which restarts after a retry) and tells Optuna that a trial stopped by ASHA is
COMPLETE with its truncated score. Here intermediate values are reported at the
trial's own ``epoch`` counter, and a trial that ended before ``max_epochs`` without an
error is told as PRUNED (Optuna then keeps its intermediate values, and TPE does not
treat an early score as a final one). A diverged trial is told as FAIL.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from semiseg.tracking import METRIC_DIVERGED, METRIC_EPOCH
from semiseg.tune.failures import ERROR_KEY


def _finished_states() -> tuple:
    import optuna

    TrialState = optuna.trial.TrialState
    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class EpochAwareOptunaSearch(OptunaSearch):
    """:class:`OptunaSearch` with epoch steps and honest PRUNED/FAIL states.

    Args:
        max_epochs: epochs of a full trial.
        **kwargs: passed to :class:`OptunaSearch`.
    """

    def __init__(self, *, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_epochs = max_epochs
        self._reported_steps: dict[str, set[int]] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Report the metric to Optuna at step = epoch, once per epoch."""
        if trial_id in self._completed_trials or self.metric not in result or result.get(ERROR_KEY):
            return
        if self._told_before(trial_id):
            return
        epoch = int(result.get(METRIC_EPOCH, 0))
        seen = self._reported_steps.setdefault(trial_id, set())
        if epoch in seen:
            return
        seen.add(epoch)
        self._ot_trials[trial_id].report(float(result[self.metric]), epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna COMPLETE, PRUNED (stopped early) or FAIL (error or diverged)."""
        import optuna

        if trial_id in self._completed_trials:
            return
        if self._told_before(trial_id):
            self._completed_trials.add(trial_id)
            return
        trial = self._ot_trials[trial_id]
        if result and self.metric in result:
            self.on_trial_result(trial_id, result)
        value = None if not result else result.get(self.metric)
        if error or value is None or (result and result.get(METRIC_DIVERGED)):
            state, value = optuna.trial.TrialState.FAIL, None
        elif int(result.get(METRIC_EPOCH, 0)) < self.max_epochs:
            state, value = optuna.trial.TrialState.PRUNED, None
        else:
            state = optuna.trial.TrialState.COMPLETE
        self._ot_study.tell(trial, value, state=state)
        self._completed_trials.add(trial_id)
        self._reported_steps.pop(trial_id, None)

    def _told_before(self, trial_id: str) -> bool:
        """Whether Optuna's storage already holds a final state for this trial.

        The searcher's own state is saved with Tune's experiment snapshots, the Optuna
        storage at every tell: a driver killed between the two resumes with a searcher that
        does not remember telling a trial that Optuna has finished. Telling it again would
        raise ("Cannot tell a COMPLETE trial") and end the resumed study.
        """
        number = self._ot_trials[trial_id].number
        finished = self._ot_study.get_trials(deepcopy=False, states=_finished_states())
        return any(trial.number == number for trial in finished)
