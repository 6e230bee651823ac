"""A finished study's Optuna storage holds what ``optuna-dashboard`` shows: its trials, their
per-epoch values and their states (COMPLETE, or PRUNED for the trials ASHA stopped)."""

from __future__ import annotations

import optuna
import pytest

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE
from tests.integration.conftest import study_runs

pytestmark = pytest.mark.integration
MAX_EPOCHS = 3
STUDY = Study(name="optuna_storage", description="a search ASHA cuts short",
              base={**SMOKE, "method.name": "supervised", "train.max_epochs": MAX_EPOCHS, "train.steps_per_epoch": 16},
              methods={"supervised": ["optim.lr"]}, ranges={"optim.lr": (1e-4, 3e-2)},
              num_samples=4, startup_trials=4, grace_period=1, reduction_factor=2)
OPTUNA_STATE = {"completed": optuna.trial.TrialState.COMPLETE, "stopped_early": optuna.trial.TrialState.PRUNED}


def _history(client, run_id: str) -> tuple[tuple[int, float], ...]:
    return tuple(sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/dice")))


def test_the_optuna_storage_has_every_trial_with_its_epochs_and_state(ray_local, mlflow_store, tmp_path):
    run_study(STUDY, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store, "--max-concurrent", "1",
                      "--skip-baselines", "--seed", "7"])
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna_storage' / 'optuna.db'}")
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.study_name.startswith("optuna_storage-search-supervised-")
    assert summary.direction == optuna.study.StudyDirection.MAXIMIZE and summary.n_trials == 4
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials

    client, _, children = study_runs(mlflow_store, "optuna_storage")
    mlflow_trials = {_history(client, child.info.run_id): OPTUNA_STATE[child.data.tags["semiseg.status"]]
                     for child in children}
    optuna_trials = {tuple(sorted(trial.intermediate_values.items())): trial.state for trial in trials}
    assert optuna_trials == mlflow_trials, "each epoch's val/dice in Optuna is the one in MLflow"
    assert {trial.state for trial in trials} == set(OPTUNA_STATE.values()), "ASHA stopped some trials, not all"
    for trial in trials:
        last_epoch = max(trial.intermediate_values)
        assert sorted(trial.intermediate_values) == list(range(1, last_epoch + 1))
        assert (last_epoch == MAX_EPOCHS) == (trial.state == optuna.trial.TrialState.COMPLETE)
        assert trial.value == trial.intermediate_values[last_epoch]
        assert set(trial.params) == {"optim.lr"} and 1e-4 <= trial.params["optim.lr"] <= 3e-2, trial.params
