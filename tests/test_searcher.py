"""Optuna learns the truth about trials: COMPLETE, PRUNED by ASHA, FAIL when diverged."""

import optuna
import pytest

from semiseg.tune.searcher import EpochAwareOptunaSearch
from semiseg.tune.space import complement_name, method_space


def _searcher(max_epochs=3):
    searcher = EpochAwareOptunaSearch(space=method_space("mean_teacher", ["ema_decay"]), metric="val/dice",
                                      mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                                      max_epochs=max_epochs)
    return searcher


def _trial(searcher, trial_id):
    return searcher._ot_study.trials[searcher._ot_trials[trial_id].number]


def test_suggestions_search_one_minus_decay_on_a_log_scale():
    searcher = _searcher()
    config = searcher.suggest("t0")
    complement = config["search"][complement_name("method.ema_decay").split("/", 1)[1]]
    assert config["method.ema_decay"] == pytest.approx(1 - complement)
    assert 0.9 <= config["method.ema_decay"] <= 0.9999
    distribution = _trial(searcher, "t0").distributions[complement_name("method.ema_decay")]
    assert distribution.log and distribution.low == pytest.approx(1e-4) and distribution.high == pytest.approx(0.1)


def test_full_trial_is_complete_with_its_epoch_values():
    searcher = _searcher()
    searcher.suggest("t0")
    for epoch, dice in [(1, 0.2), (2, 0.4)]:
        searcher.on_trial_result("t0", {"val/dice": dice, "epoch": epoch})
    searcher.on_trial_complete("t0", {"val/dice": 0.5, "epoch": 3})
    trial = _trial(searcher, "t0")
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.5
    assert trial.intermediate_values == {1: 0.2, 2: 0.4, 3: 0.5}


def test_trial_stopped_by_asha_is_pruned_not_complete():
    searcher = _searcher()
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"val/dice": 0.1, "epoch": 1})
    searcher.on_trial_complete("t1", {"val/dice": 0.1, "epoch": 1})
    trial = _trial(searcher, "t1")
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.intermediate_values == {1: 0.1}


def test_repeated_epochs_after_a_retry_are_reported_once():
    searcher = _searcher()
    searcher.suggest("t2")
    searcher.on_trial_result("t2", {"val/dice": 0.3, "epoch": 1})
    searcher.on_trial_result("t2", {"val/dice": 0.9, "epoch": 1})
    searcher.on_trial_complete("t2", {"val/dice": 0.6, "epoch": 3})
    assert _trial(searcher, "t2").intermediate_values == {1: 0.3, 3: 0.6}


def test_diverged_and_errored_trials_fail():
    searcher = _searcher()
    searcher.suggest("t3")
    searcher.on_trial_complete("t3", {"val/dice": 0.0, "epoch": 2, "diverged": 1.0})
    searcher.suggest("t4")
    searcher.on_trial_complete("t4", None, error=True)
    assert _trial(searcher, "t3").state == optuna.trial.TrialState.FAIL
    assert _trial(searcher, "t4").state == optuna.trial.TrialState.FAIL


def test_a_resumed_searcher_does_not_tell_a_trial_optuna_has_finished():
    """A driver killed after Optuna's tell but before Tune's snapshot resumes with a searcher that
    forgot the tell; the trial's later result and completion must not end the study."""
    import pickle

    searcher = _searcher()
    searcher.suggest("t5")
    searcher.on_trial_result("t5", {"val/dice": 0.2, "epoch": 1})
    snapshot = pickle.dumps(searcher)
    searcher.on_trial_complete("t5", {"val/dice": 0.7, "epoch": 3})
    resumed = pickle.loads(snapshot)
    resumed._ot_study = searcher._ot_study
    resumed.on_trial_result("t5", {"val/dice": 0.4, "epoch": 2})
    resumed.on_trial_complete("t5", None, error=True)
    trial = _trial(resumed, "t5")
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.7
    assert trial.intermediate_values == {1: 0.2, 3: 0.7}
