"""The phases of a study on Ray Tune: the searches (Optuna's TPE behind a concurrency limit,
ASHA on the reported ``epoch``), the final phase of fixed configurations, and the check
after each phase that stops the study when every trial of it errored.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from semiseg.methods.registry import experiment_config
from semiseg.tracking import Tracker, redact_uri
from semiseg.train.contract import DATASET_KEY, STORAGE_KEY, VARIANT_KEY, expand_trial_config
from semiseg.tune.cli import StudyArgs
from semiseg.tune.configs import Search, baseline_config, config_for_method, public, study_baselines
from semiseg.tune.failures import NoRetryOfDeterministicErrors
from semiseg.tune.ray_lost import RayLostError, ray_lost_reason
from semiseg.tune.report import print_errored, progress_reporter, report, summarise
from semiseg.tune.retention import CheckpointRetention
from semiseg.tune.results import TrialRow, first_error_line, rows_from_results
from semiseg.tune.study import Study
from semiseg.tune.trainables import make_trainable

STATE_FILE = "study_state.json"
CLUSTER_CONCURRENCY = 8
MAX_FAILURES = 2
"""Retries of a trial that lost its worker (a deterministic error is not retried)."""


class TrialsFailedError(Exception):
    """Every trial of a phase errored; the message is the first error's one line."""


class StudyInterruptedError(Exception):
    """The user stopped a phase (Ctrl+C, SIGINT): Tune saved its state, and the study stops rather
    than go on to its next phase; ``--resume`` continues it. The message is the phase's name."""


def fit_phase(tuner: Any, phase: str) -> Any:
    """``tuner.fit()``, then :class:`StudyInterruptedError` when the user stopped it.

    Tune answers the first SIGINT by saving its state, stopping the trials (they end as
    terminated, like finished ones) and returning from ``fit`` as if the run had ended; a study
    would then start its next phase. Tune's handler puts back the handler it found when it
    fires, so the one installed here around ``fit`` tells whether it fired; it also records a
    SIGINT Tune did not catch, and a second one raises ``KeyboardInterrupt`` as Python would.
    Outside the main thread (no signal handlers there) a run that ended with trials pending or
    running is taken as interrupted.

    Raises:
        StudyInterruptedError: the phase was stopped by SIGINT.
        RayLostError: Ray itself stopped under the phase (see :mod:`semiseg.tune.ray_lost`).
    """
    try:
        return _fit(tuner, phase)
    except Exception as error:
        reason = ray_lost_reason(error)
        if reason is None:
            raise
        raise RayLostError(phase, reason) from error


def _fit(tuner: Any, phase: str) -> Any:
    """``tuner.fit()`` with the interruption check of :func:`fit_phase`."""
    if threading.current_thread() is not threading.main_thread():
        results = tuner.fit()
        if results.num_terminated + results.num_errors < len(results):
            raise StudyInterruptedError(phase)
        return results
    received: list[int] = []

    def record_interrupt(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, record_interrupt)
    try:
        results = tuner.fit()
        tune_installed_its_handler = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        tune_handler_fired = tune_installed_its_handler and signal.getsignal(signal.SIGINT) is record_interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
    if received or tune_handler_fired:
        raise StudyInterruptedError(phase)
    return results


@dataclass
class PhaseContext:
    """What every phase of one study invocation shares: its arguments, tracking and folders."""

    study: Study
    args: StudyArgs
    base: dict[str, Any]
    tracker: Tracker
    experiment_id: str | None
    parent_run_id: str | None
    dataset_name: str
    max_epochs: int
    runs_root: Path
    study_dir: Path
    ray_storage: str
    joined_cluster: bool = False
    state: dict = field(default_factory=dict)
    """The study's resumable state (``study_state.json``)."""
    shown_errors: set[str] = field(default_factory=set)
    """Ids of the errored trials whose line the progress reporter printed when they errored."""
    running_phase: str = "start-up"
    """The phase Tune runs now (named when Ray stops under it)."""

    def save_state(self) -> None:
        save_state(self.study_dir, self.state)

    def callback(self, phase: str):
        from semiseg.tune.callbacks import MlflowTrialCallback

        resources = {"semiseg.workers_per_trial": str(self.args.workers_per_trial),
                     "semiseg.cpus_per_worker": str(self.args.cpus_per_worker),
                     "semiseg.gpus_per_worker": str(self.args.gpus_per_worker)}
        return MlflowTrialCallback(self.tracker, self.experiment_id, self.parent_run_id, self.study.name, phase,
                                   self.dataset_name, self.max_epochs, resources)

    @property
    def reuse_actors(self) -> bool:
        """Single-worker trials run one after another in the same trial processes.

        The loop sets every piece of process state it depends on per trial (seeds, torch
        threads, the session), so a reused process gives bit-identical results
        (tests/test_trial_isolation.py); it saves each trial the ~2-3 s of a new process
        (torch import, data preparation). DDP trials keep fresh drivers.
        """
        return self.args.workers_per_trial == 1

    def run_config(self, phase: str, keys: Sequence[str] = ()):
        """Tune's run configuration of ``phase`` (``keys``: the searched keys shown in the progress lines).

        Tune's verbosity 1 lets it call the progress reporter and keeps its per-trial lines off
        the console; with ``--verbose`` the reporter is Tune's own status table.
        """
        from ray import tune

        reporter = progress_reporter(phase, self.study.metric, self.study.mode, keys, self.max_epochs,
                                     verbose=self.args.verbose, shown_errors=self.shown_errors)
        return tune.RunConfig(name=f"{self.study.name}-{phase}", storage_path=self.ray_storage,
                              callbacks=[self.callback(phase), NoRetryOfDeterministicErrors(MAX_FAILURES),
                                         CheckpointRetention(keep=2)],
                              failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                              checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                              progress_reporter=reporter, verbose=1)

    def trainable(self):
        return make_trainable(self.args.workers_per_trial, self.args.cpus_per_worker, self.args.gpus_per_worker,
                              metric=self.study.metric)

    def experiment_path(self, phase: str) -> str:
        return f"{self.ray_storage}/{self.study.name}-{phase}"

    def max_concurrent(self, trials: int) -> int:
        """``--max-concurrent``; else what the resources fit now, and on a joined cluster at least
        ``min(trials, CLUSTER_CONCURRENCY)``.

        An autoscaling cluster starts with no workers: sizing by its current resources would
        run one trial at a time and never scale it up; unlimited concurrency would leave TPE
        without feedback (every suggestion made before any result).
        """
        if self.args.max_concurrent:
            return self.args.max_concurrent
        import ray

        resources = ray.cluster_resources()
        per_trial_cpu = self.args.cpus_per_worker * self.args.workers_per_trial
        slots = int(resources.get("CPU", 1) // per_trial_cpu)
        if self.args.gpus_per_worker > 0:
            per_trial_gpu = self.args.gpus_per_worker * self.args.workers_per_trial
            slots = min(slots, int(resources.get("GPU", 0) // per_trial_gpu + 1e-9))
        if self.joined_cluster:
            slots = max(slots, min(trials, CLUSTER_CONCURRENCY))
        return max(1, slots)


def run_search(context: PhaseContext, search: Search, num_samples: int) -> list[TrialRow]:
    """Run one search (or resume it with ``--resume``); return its trials' rows."""
    results = fit_phase(_restored_or_new(context, search.phase, lambda: _new_search(context, search, num_samples)),
                        search.phase)
    keys = list(search.space.keys) or _searched_keys(results)
    return rows_from_results(results, search.phase, keys, context.max_epochs)


def _new_search(context: PhaseContext, search: Search, num_samples: int):
    """A new Tuner of ``search``: TPE in the study's Optuna storage, ASHA on the epochs."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from semiseg.tune.scheduler import make_scheduler
    from semiseg.tune.searcher import EpochAwareOptunaSearch

    study, space = context.study, search.space
    storage = optuna.storages.RDBStorage(f"sqlite:///{context.study_dir / 'optuna.db'}")
    optuna_name = context.state.setdefault(f"optuna_study/{search.phase}",
                                           f"{study.name}-{search.phase}-{context.parent_run_id or 'local'}")
    sampler = optuna.samplers.TPESampler(seed=context.args.seed,
                                         n_startup_trials=min(study.startup_trials, num_samples),
                                         multivariate=True, constant_liar=True)
    seed_point = space.default_point() if study.seed_with_defaults else {}
    searcher = EpochAwareOptunaSearch(space=space, metric=study.metric, mode=study.mode, sampler=sampler,
                                      storage=storage, study_name=optuna_name, max_epochs=context.max_epochs,
                                      points_to_evaluate=[seed_point] if seed_point else None)
    scheduler = make_scheduler(study, context.study_dir, search.phase, context.max_epochs)
    tuner = tune.Tuner(context.trainable(), param_space=search.base,
                       tune_config=tune.TuneConfig(
                           search_alg=ConcurrencyLimiter(searcher, context.max_concurrent(num_samples)),
                           scheduler=scheduler, metric=study.metric, mode=study.mode, num_samples=num_samples,
                           trial_dirname_creator=trial_dirname, reuse_actors=context.reuse_actors),
                       run_config=context.run_config(search.phase, space.keys))
    context.save_state()
    return tuner


def run_fixed(context: PhaseContext, phase: str, variants: list[dict[str, Any]],
              shown_keys: list[str]) -> list[TrialRow]:
    """Run fixed configurations to the end (no early stopping), as many at once as fit."""
    from ray import tune

    def new():
        param_space = {STORAGE_KEY: context.base[STORAGE_KEY], DATASET_KEY: context.base.get(DATASET_KEY),
                       VARIANT_KEY: tune.grid_search(variants)}
        return tune.Tuner(context.trainable(), param_space=param_space,
                          tune_config=tune.TuneConfig(max_concurrent_trials=context.max_concurrent(len(variants)),
                                                      metric=context.study.metric, mode=context.study.mode,
                                                      trial_dirname_creator=trial_dirname,
                                                      reuse_actors=context.reuse_actors),
                          run_config=context.run_config(phase, ["method.name", *shown_keys]))

    results = fit_phase(_restored_or_new(context, phase, new), phase)
    return rows_from_results(results, phase, shown_keys, context.max_epochs)


def _restored_or_new(context: PhaseContext, phase: str, new: Callable[[], Any]):
    """The Tuner of ``phase``: restored from its experiment with ``--resume`` when there is one, else ``new()``."""
    from ray import tune

    path = context.experiment_path(phase)
    context.running_phase = phase
    if context.args.resume and tune.Tuner.can_restore(path):
        print(f"resuming {phase} from {redact_uri(path)}", flush=True)
        return tune.Tuner.restore(path, context.trainable(), resume_errored=True, resume_unfinished=True)
    return new()


def check_phase(context: PhaseContext, phase: str, rows: list[TrialRow]) -> None:
    """Print a line per errored trial of ``phase``; stop the study if all of them errored.

    Raises:
        TrialsFailedError: after writing ``results.json`` and ending the MLflow run FAILED.
    """
    phase_rows = [r for r in rows if r.phase == phase]
    errored = [r for r in phase_rows if r.status == "error"]
    if not errored:
        return
    print_errored(phase, errored, len(phase_rows), context.shown_errors)
    if len(errored) < len(phase_rows):
        return
    outcome = summarise(context.study, redact_uri(context.tracker.tracking_uri), context.parent_run_id, rows)
    report(outcome, context.tracker, context.parent_run_id, context.study_dir)
    if context.parent_run_id:
        context.tracker.end_run(context.parent_run_id, "FAILED")
    raise TrialsFailedError(f"{phase}: all {len(phase_rows)} trial(s) errored; first: {first_error_line(errored)}")


def final_phase_seeds(search_seed: int, final_seeds: int) -> list[int]:
    """Training seeds of the final phase.

    With ``final_seeds`` > 0 they follow the search's seed (``search_seed + 1`` onwards): a
    searched configuration was chosen for what it reached with ``search_seed``, so re-running
    it with that seed repeats the chosen trial (bit for bit on CPU), adds no information, and
    carries the selection's luck into the reported mean. With 0 the baselines run once, with
    the search's own seed, beside the searched trials they are compared with.
    """
    if final_seeds <= 0:
        return [search_seed]
    return [search_seed + offset for offset in range(1, final_seeds + 1)]


def final_variants(study: Study, base: dict[str, Any], rows: list[TrialRow], final_seeds: int,
                   args: StudyArgs, final_splits: int = 1) -> list[dict[str, Any]]:
    """Configurations of the final phase: each search's top-k and every baseline, per split and seed.

    With ``final_splits`` > 1 every configuration also runs on splits 1 … K−1 (``data.split``:
    other draws of which cases are labelled and validate, or the entries of ``--splits``), each
    with every final seed; split 0 is the one the search trained on.

    A baseline equal to a searched best (e.g. a protocol with the default value the search
    found best) runs once: a repeated identical trial would count twice in the mean.
    """
    configs: list[dict[str, Any]] = []
    if final_seeds > 0:
        for phase in sorted({r.phase for r in rows}):
            ranked = sorted((r for r in rows if r.phase == phase and r.best_val_dice == r.best_val_dice),
                            key=lambda r: -r.best_val_dice)
            configs += [r.config for r in ranked[:study.final_top_k]]
        configs += [public(config_for_method(base, m)) for m, keys in study.methods.items() if not keys]
    if not args.skip_baselines:
        configs += [baseline_config(base, baseline) for baseline in study_baselines(study, args)]
    variants: list[dict[str, Any]] = []
    for config in configs:
        for split in range(max(1, final_splits)):
            for seed in final_phase_seeds(args.seed, final_seeds):
                variant = experiment_config({**config, "data.split": split, "train.seed": seed}).to_flat()
                if variant not in variants:
                    variants.append(variant)
    return variants


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default embeds the whole config)."""
    return f"trial_{trial.trial_id}"


def _searched_keys(results) -> list[str]:
    """The dotted keys whose values differ between the trials of ``results`` (for a space without keys)."""
    keys: set[str] = set()
    configs = [expand_trial_config(r.config or {}) for r in results]
    for key in {k for c in configs for k in c if "." in k and not k.startswith("_")}:
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}
        if len(values) > 1:
            keys.add(key)
    return sorted(keys)


def load_state(study_dir: Path) -> dict:
    """The study's saved state (``study_state.json``), {} when there is none."""
    path = study_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(study_dir: Path, state: dict) -> None:
    """Write the study's state atomically."""
    path = study_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)
