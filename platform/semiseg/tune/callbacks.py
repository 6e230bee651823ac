"""Ray Tune callbacks of a study: one MLflow child run per trial, logged from the driver.

Each run also gets the trial's data as its dataset input (:mod:`semiseg.tune.lineage`), and
its trial process is told where the run is, so that it samples its machine's system metrics
into it (:mod:`semiseg.train.system_metrics`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from semiseg.config import ConfigError
from semiseg.train.contract import OVERLAY_FILE, expand_trial_config
from semiseg.train.system_metrics import share_trial_run, withdraw_trial_run
from semiseg.tune.failures import ERROR_KEY, describe_error
from semiseg.tune.lineage import trial_lineage
from semiseg.tracking import (CONFIG_ARTIFACT, METRIC_DIVERGED, METRIC_EPOCH, STATUS_ORPHANED,
                              SYSTEM_METRICS_INTERVAL_S, TAG_PARENT, TAG_PHASE, TAG_STATUS, TAG_TRIAL_ID, Tracker,
                              flatten_for_params, loggable_metrics, system_metrics_interval, trial_tags)

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("val/dice_best", "best_epoch", "epoch", "test/dice", "test/hd95", "test/asd")
STATUS_COMPLETED = "completed"
STATUS_STOPPED = "stopped_early"
STATUS_DIVERGED = "diverged"
STATUS_ERROR = "error"
TAG_ERROR = "semiseg.error"
"""Tag of a FAILED trial run: ``Type: message`` of the error it ended with."""


class MlflowTrialCallback(Callback):
    """Opens (or, on resume, reopens) a child run per trial and logs every epoch to it.

    Args:
        tracker: the guarded MLflow client.
        experiment_id: the study's experiment.
        parent_run_id: the study's parent run.
        study: study name (tag).
        phase: ``search`` or ``baseline`` (tag).
        dataset: dataset name (tag).
        max_epochs: epochs of a full trial, to tell completed from stopped trials.
        resource_tags: what each trial reserved (workers, CPUs and GPUs per worker), for cost reports.
    """

    def __init__(self, tracker: Tracker, experiment_id: str | None, parent_run_id: str | None, study: str,
                 phase: str, dataset: str, max_epochs: int, resource_tags: dict[str, str] | None = None) -> None:
        self.tracker = tracker
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.study = study
        self.phase = phase
        self.dataset = dataset
        self.max_epochs = max_epochs
        self.resource_tags = dict(resource_tags or {})
        self.run_ids: dict[str, str] = {}
        self.last_epoch: dict[str, int] = {}
        self.diverged: set[str] = set()
        self.errors: dict[str, str] = {}

    def _run_for(self, trial: Any) -> str | None:
        if trial.trial_id in self.run_ids:
            return self.run_ids[trial.trial_id]
        if self.experiment_id is None:
            return None
        run_id = self.tracker.find_run(self.experiment_id, {TAG_TRIAL_ID: trial.trial_id,
                                                            "semiseg.phase": self.phase})
        if run_id is None:
            config = expand_trial_config(trial.config)
            tags = {**trial_tags(self.study, str(config.get("method.name", "?")), trial.trial_id, self.phase,
                                 self.parent_run_id, self.dataset), **self.resource_tags}
            run_id = self.tracker.start_run(self.experiment_id, f"{self.phase}-{trial.trial_id}", tags)
            if run_id is not None:
                self.tracker.log_params(run_id, flatten_for_params(config))
                self.tracker.log_json(run_id, flatten_for_params(config), CONFIG_ARTIFACT)
                lineage = trial_lineage(trial.config, self.dataset)
                if lineage is not None:
                    lineage.log(self.tracker, run_id)
        if run_id is not None:
            self.run_ids[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        """Open the trial's child run and tell the trial where it is, for its system metrics.

        Tune calls this before it sends the trial process its first ``train`` call, so the
        trial finds the run as its loop starts.
        """
        run_id = self._run_for(trial)
        if run_id is not None and self.tracker.enabled:
            share_trial_run(trial.trial_id, run_id, self.tracker.tracking_uri, self._sampling_interval())

    @staticmethod
    def _sampling_interval() -> float:
        """:func:`semiseg.tracking.system_metrics_interval`, the default (logged) when it is malformed."""
        try:
            return system_metrics_interval()
        except ConfigError as error:
            log.warning("%s; sampling every %g s", error, SYSTEM_METRICS_INTERVAL_S)
            return SYSTEM_METRICS_INTERVAL_S

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info) -> None:
        """Log the epoch's metrics at step = epoch, once per epoch.

        Tune hands a result to the callbacks before the trial's save of that epoch's
        checkpoint has been registered; a trial process that dies in between is retried
        from the checkpoint before, and re-reports that one epoch (exact resume: the same
        metrics). The re-report is not logged again, so each step has one value.
        """
        run_id = self._run_for(trial)
        if result.get(ERROR_KEY):
            self.errors[trial.trial_id] = str(result[ERROR_KEY])
            return
        epoch = int(result.get(METRIC_EPOCH, 0))
        if result.get(METRIC_DIVERGED):
            self.diverged.add(trial.trial_id)
        logged = self.last_epoch.get(trial.trial_id, 0)
        self.last_epoch[trial.trial_id] = max(epoch, logged)
        if epoch <= logged:
            log.info("trial %s re-reported epoch %d after a retry; already logged", trial.trial_id, epoch)
            return
        if run_id is not None:
            self.tracker.log_metrics(run_id, loggable_metrics(result), step=epoch)

    def trial_status(self, trial_id: str) -> str:
        """completed, stopped_early or diverged, from what the trial reported."""
        if trial_id in self.diverged:
            return STATUS_DIVERGED
        return STATUS_COMPLETED if self.last_epoch.get(trial_id, 0) >= self.max_epochs else STATUS_STOPPED

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        """Close the run: summary metrics, the best epoch's overlay, a status tag, FINISHED."""
        withdraw_trial_run(trial.trial_id)
        run_id = self._run_for(trial)
        if run_id is None:
            return
        last = trial.last_result or {}
        summary = {f"summary/{key.replace('/', '_')}": value
                   for key, value in loggable_metrics(last).items() if key in SUMMARY_KEYS}
        self.tracker.log_metrics(run_id, summary, step=int(last.get(METRIC_EPOCH, 0)))
        self._log_overlay(run_id, trial)
        self.tracker.set_tags(run_id, {TAG_STATUS: self.trial_status(trial.trial_id)})
        self.tracker.end_run(run_id, "FINISHED")

    def _log_overlay(self, run_id: str, trial: Any) -> None:
        checkpoint = getattr(trial, "checkpoint", None)
        if checkpoint is None:
            return
        try:
            with checkpoint.as_directory() as folder:
                overlay = Path(folder) / OVERLAY_FILE
                if overlay.exists():
                    self.tracker.log_file(run_id, overlay)
        except (OSError, RuntimeError) as error:
            log.warning("no overlay for trial %s: %s", trial.trial_id, error)

    def on_experiment_end(self, trials: list, **info) -> None:
        """Close this phase's runs of trials the experiment does not hold as KILLED, tagged orphaned.

        A driver killed just after a trial opened its run, before Tune's next experiment
        checkpoint, leaves a run for a trial that the resumed study never sees (Tune suggests
        another one in its place). Such a run keeps whatever it logged.
        """
        if self.experiment_id is None or self.parent_run_id is None:
            return
        known = {trial.trial_id for trial in trials}
        runs = self.tracker.find_runs(self.experiment_id, {TAG_PARENT: self.parent_run_id, TAG_PHASE: self.phase})
        for run in runs:
            if run.data.tags.get(TAG_TRIAL_ID) not in known and run.info.status == "RUNNING":
                self.tracker.set_tags(run.info.run_id, {TAG_STATUS: STATUS_ORPHANED})
                self.tracker.end_run(run.info.run_id, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        """Close the run as FAILED, tagged with the error (``Type: message``)."""
        withdraw_trial_run(trial.trial_id)
        run_id = self._run_for(trial)
        if run_id is not None:
            self.tracker.set_tags(run_id, {TAG_STATUS: STATUS_ERROR, TAG_ERROR: self._error_of(trial)})
            self.tracker.end_run(run_id, "FAILED")

    def _error_of(self, trial: Any) -> str:
        """The trial's error in one line: what it reported, else its pickled exception."""
        if trial.trial_id in self.errors:
            return self.errors[trial.trial_id]
        try:
            return describe_error(trial.get_pickled_error()) or "unknown error"
        except Exception as error:  # noqa: BLE001 - a tag is not worth failing the callback
            log.warning("no error description for trial %s: %s", trial.trial_id, error)
            return "unknown error"
