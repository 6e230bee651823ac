"""Run a study: validate the data, start or join Ray, search, run baselines, report.

Phases of one invocation (one MLflow parent run):

1. the searches: Ray Tune with Optuna's TPE (seeded, in an RDB storage so the study can
   resume) behind a concurrency limit, and ASHA on the reported ``epoch``; one search,
   or one per method with the same trial budget;
2. the final phase: the top configurations of each search and the baselines (e.g. the
   supervised model on the same labelled cases) re-run to the end with the same seeds,
   so methods are compared as mean (std) over seeds, not as one lucky trial.

Input errors (a missing or malformed dataset, a bad config key, a ``--storage-path`` or
``--state-dir`` that is a file, resources that no node can ever provide: see
:mod:`semiseg.tune.resources`) print one clear message and exit with status 2
(:data:`EXIT_INPUT_ERROR`), without a traceback; on a local Ray they are found before Ray starts.

Trials that fail: an error that recurs on every attempt (a configuration or code error,
e.g. a model too deep for the images) ends its trial at once, a lost worker is retried
(:mod:`semiseg.tune.failures`). A phase in which some trials errored goes on and reports
them (one line each; ``status``, ``error`` and ``error_file`` in ``results.json``; MLflow runs
FAILED with a ``semiseg.error`` tag). When every trial of a search, or of the final phase,
errored, the study stops there: it writes ``results.json``, ends its MLflow run FAILED,
prints ``error: <phase>: all N trial(s) errored; first: trial ID: Type: message (error file
PATH)`` and exits with status 1 (:data:`EXIT_TRIALS_FAILED`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from semiseg.config import ConfigError, ExperimentConfig
from semiseg.data.cache import CachedDataset, absent_label_problem
from semiseg.data.errors import DatasetError
from semiseg.data.layout import validate_layout
from semiseg.data.source import PHANTOM, prepare_cache, resolve_dataset
from semiseg.data.splits import make_split
from semiseg.tracking import (TAG_OPTUNA_STORAGE, TAG_STORAGE_PATH, Tracker, check_tracking_uri, default_tracking_uri,
                              metric_name, mlflow_ui_command, redact_uri, study_tags)
from semiseg.train.checks import check_config
from semiseg.train.contract import STORAGE_KEY, VARIANT_KEY, expand_trial_config
from semiseg.tune.local_ray import init_ray
from semiseg.tune.model_registry import register_best_models
from semiseg.tune.cli import StudyArgs, check_paths, parse_args
from semiseg.tune.failures import NoRetryOfDeterministicErrors
from semiseg.tune.resources import ResourceError, TrialRequest, check_cluster_resources, check_local_resources
from semiseg.tune.results import (TrialRow, best_row, final_table, first_error_line, format_final_table,
                                  format_table, rows_from_results)
from semiseg.tune.space import method_space
from semiseg.tune.study import Study
from semiseg.tune.trainables import make_trainable

log = logging.getLogger("semiseg.study")
STATE_FILE = "study_state.json"
RESULTS_FILE = "results.json"
CLUSTER_CONCURRENCY = 8
EXIT_INPUT_ERROR = 2
EXIT_TRIALS_FAILED = 1
"""Exit status of a study whose searched or final trials all errored."""
MAX_FAILURES = 2
"""Retries of a trial that lost its worker (a deterministic error is not retried)."""


class TrialsFailedError(Exception):
    """Every trial of a phase errored; the message is the first error's one line."""


@dataclass
class StudyOutcome:
    """What a finished study returns (and writes to ``results.json``)."""

    study: str
    tracking_uri: str  # redacted (secrets as ***): it is printed and written to results.json
    parent_run_id: str | None
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    final: dict[str, dict[str, tuple[float, float, int]]] = field(default_factory=dict)
    final_val: dict[str, dict[str, tuple[float, float, int]]] = field(default_factory=dict)
    registered_models: list[str] = field(default_factory=list)


def run_study(study: Study, argv: Sequence[str] | None = None) -> StudyOutcome:
    """Run ``study`` with the shared CLI and print its results.

    Args:
        study: the study description.
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The outcome (also written as JSON under the study's folder).

    Raises:
        SystemExit: status 2 on input errors (dataset, configuration, impossible resources),
            status 1 when every trial of a phase errored, after one message.
    """
    import ray

    args = parse_args(f"{study.name}.py", study.description, argv)
    _console_logging()
    ray_was_connected = ray.is_initialized()
    try:
        check_paths(args)
        if not (ray_was_connected or args.address or os.environ.get("RAY_ADDRESS")):
            check_local_resources(TrialRequest.from_args(args))
        check_tracking_uri(args.tracking_uri)
        study = study.restricted_to(args.methods)
        base = resolve_base_config(study, args)
        check_searches(study, args)
        check_trained_configs(study, args, base)
        layout_name = check_dataset(base, _baselines(study, args))
    except (DatasetError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT_ERROR) from None
    try:
        return execute(study, args, base, layout_name)
    except (ResourceError, TrialsFailedError) as error:
        if ray.is_initialized() and not ray_was_connected:
            ray.shutdown()
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INPUT_ERROR if isinstance(error, ResourceError) else EXIT_TRIALS_FAILED) from None


def resolve_base_config(study: Study, args: StudyArgs) -> dict[str, Any]:
    """Defaults < study base < smoke overrides < CLI flags < ``--set`` overrides, as a flat dict.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    flat: dict[str, Any] = dict(study.base)
    if args.smoke:
        flat.update(study.smoke)
    flat["data.dataset"] = args.dataset if args.dataset == PHANTOM else str(Path(args.dataset).expanduser().resolve())
    flat["train.seed"] = args.seed
    flat["data.split_seed"] = args.seed
    flat["train.threads"] = args.cpus_per_worker
    flat["train.amp"] = flat.get("train.amp", args.gpus_per_worker > 0)
    if args.max_epochs is not None:
        flat["train.max_epochs"] = args.max_epochs
    flat.update(dict(args.overrides))
    return ExperimentConfig.from_flat(flat).to_flat()


def _console_logging() -> None:
    """Progress lines (INFO) to stdout, warnings and errors to stderr: stderr holds only what needs attention."""
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    attention = logging.StreamHandler(sys.stderr)
    attention.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[progress, attention])


def check_trained_configs(study: Study, args: StudyArgs, base: dict[str, Any]) -> None:
    """Check every configuration the study will train before Ray starts: the base, each
    searched method's and each baseline's (see :func:`semiseg.train.checks.check_config`).

    Searched values come from declared choices and ranges, which are checked where they are
    declared (:class:`semiseg.methods.base.HParam`) or replaced (:func:`semiseg.tune.space.with_range`).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    methods = list(study.methods)
    if getattr(study.search_space, "chooses_method", False):
        methods += list(study.search_space.methods)
    configs = [base] + [_config_for_method(base, method) for method in methods]
    for baseline in _baselines(study, args):
        method = str(baseline.get("method.name", base["method.name"]))
        configs.append({**_public(_config_for_method(base, method)), **baseline})
    for config in configs:
        check_config(ExperimentConfig.from_flat(_public(config)))


def _baselines(study: Study, args: StudyArgs) -> tuple[dict[str, Any], ...]:
    if args.smoke and study.smoke_baselines is not None:
        return tuple(dict(b) for b in study.smoke_baselines)
    return tuple(dict(b) for b in study.baselines)


def check_dataset(base: dict[str, Any], baselines: Sequence[dict[str, Any]] = ()) -> str:
    """Read and validate the dataset once on the driver, and check every split budget.

    Returns:
        The dataset's name (for tags).

    Raises:
        DatasetError: naming the file and the problem; also for labels declared in
            ``dataset.json`` that no label file holds, unless ``data.allow_absent_labels``.
    """
    cfg = ExperimentConfig.from_flat(base)
    layout = resolve_dataset(cfg.data)
    if cfg.data.dataset != PHANTOM:
        log.info("validating %d training cases of %s ...", len(layout.training), layout.root)
        validate_layout(layout)
    info = prepare_cache(cfg.data, layout)
    log.info("preprocessed cache %s (%s)", info.path, "reused" if info.reused else "built")
    for budget in sorted({cfg.data.num_labelled} | {int(b["data.num_labelled"]) for b in baselines
                                                      if "data.num_labelled" in b}):
        make_split(layout.labelled_ids, layout.unlabelled_ids, num_labelled=budget,
                   num_validation=cfg.data.num_validation, num_test=cfg.data.num_test, seed=cfg.data.split_seed)
    absent = absent_label_problem(CachedDataset(info.path).manifest) if cfg.data.dataset != PHANTOM else None
    if absent is not None and not cfg.data.allow_absent_labels:
        raise DatasetError([(absent[0], f"{absent[1]}; fix the label files or dataset.json, or train anyway "
                                        "with --set data.allow_absent_labels=true")])
    if absent is not None:
        log.warning("warning: %s: %s (accepted: data.allow_absent_labels)", *absent)
    return layout.name


def execute(study: Study, args: StudyArgs, base: dict[str, Any], dataset_name: str) -> StudyOutcome:
    """Run the phases of a validated study and print the report."""
    import ray

    runs_root = args.state_dir
    ray_storage = f"{args.storage_path.rstrip('/')}/ray"
    study_dir = runs_root / study.name
    study_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or default_tracking_uri(runs_root)
    max_epochs = int(base["train.max_epochs"])
    num_samples = args.num_samples or (study.smoke_num_samples if args.smoke else study.num_samples)
    final_seeds = study.smoke_final_seeds if args.smoke and study.final_seeds else study.final_seeds
    if args.final_seeds is not None:
        final_seeds = args.final_seeds
    base = {**base, STORAGE_KEY: ray_storage}
    state = _load_state(study_dir) if args.resume else {}

    started_ray = not ray.is_initialized()
    if started_ray:
        dashboard = init_ray(args.address)
        if dashboard:
            log.info("Ray dashboard: %s", dashboard)
    check_cluster_resources(TrialRequest.from_args(args))
    tracker = Tracker(tracking_uri, artifact_root=runs_root / "mlartifacts")
    tracker.reachable()
    experiment_id = tracker.experiment_id(study.name)
    parent_run_id = state.get("parent_run_id")
    if parent_run_id is None and experiment_id is not None:
        tags = {**study_tags(study.name, _study_methods(study, base), dataset_name),
                TAG_OPTUNA_STORAGE: f"sqlite:///{study_dir / 'optuna.db'}",
                TAG_STORAGE_PATH: redact_uri(args.storage_path)}
        parent_run_id = tracker.start_run(experiment_id, study.name, tags)
        if parent_run_id:
            tracker.log_params(parent_run_id, _public(base))
    # for people only (a resumed study takes the URI from its command line again): never the secrets
    state.update({"parent_run_id": parent_run_id, "tracking_uri": redact_uri(tracking_uri)})
    _save_state(study_dir, state)
    searches = _searches(study, base, search_ranges(study, args))
    print(f"\n== study {study.name}: {study.description}\n   dataset {dataset_name}; "
          f"{len(searches)} search(es) of {num_samples} trials, {max_epochs} epochs each; "
          f"final phase with {max(1, final_seeds)} seed(s); MLflow {redact_uri(tracking_uri)}\n", flush=True)

    context = _PhaseContext(study, args, base, tracker, experiment_id, parent_run_id, dataset_name,
                            max_epochs, runs_root, study_dir, ray_storage, joined_cluster=not started_ray
                            or bool(args.address or os.environ.get("RAY_ADDRESS")))
    rows: list[TrialRow] = []
    for phase, space, phase_base in searches:
        rows += _run_search(context, phase, space, phase_base, num_samples, state)
        _check_phase(context, phase, rows)
    variants = _final_variants(study, base, rows, final_seeds, args)
    if variants:
        shown = sorted({k for _, space, _ in searches for k in getattr(space, "keys", [])} | set(study.group_by))
        rows += _run_fixed(context, "final", variants, shown + ["train.seed"])
        _check_phase(context, "final", rows)

    outcome = _summarise(study, redact_uri(tracking_uri), parent_run_id, rows)
    outcome.registered_models = register_best_models(rows, tracker, experiment_id, study.name)
    _report(outcome, tracker, parent_run_id, study_dir)
    if parent_run_id:
        tracker.end_run(parent_run_id, "FINISHED")
    state["finished"] = True
    _save_state(study_dir, state)
    if started_ray:
        ray.shutdown()
    return outcome


def _check_phase(context: "_PhaseContext", phase: str, rows: list[TrialRow]) -> None:
    """Print a line per errored trial of ``phase``; stop the study if all of them errored.

    Raises:
        TrialsFailedError: after writing ``results.json`` and ending the MLflow run FAILED.
    """
    phase_rows = [r for r in rows if r.phase == phase]
    errored = [r for r in phase_rows if r.status == "error"]
    if not errored:
        return
    print(f"\n== {phase}: {len(errored)} of {len(phase_rows)} trial(s) errored", flush=True)
    for row in errored:
        print(f"   {first_error_line([row])}", flush=True)
    if len(errored) < len(phase_rows):
        return
    outcome = _summarise(context.study, redact_uri(context.tracker.tracking_uri), context.parent_run_id, rows)
    _report(outcome, context.tracker, context.parent_run_id, context.study_dir)
    if context.parent_run_id:
        context.tracker.end_run(context.parent_run_id, "FAILED")
    raise TrialsFailedError(f"{phase}: all {len(phase_rows)} trial(s) errored; first: {first_error_line(errored)}")


def _study_methods(study: Study, base: dict[str, Any]) -> list[str]:
    methods = list(study.methods) or [str(base["method.name"])]
    return methods + [str(b.get("method.name", base["method.name"])) for b in study.baselines]


def check_searches(study: Study, args: StudyArgs) -> None:
    """Build every method's search space once, so that a bad name, range or seed point fails
    before Ray starts.

    Raises:
        ConfigError: a name a method does not declare, and see :func:`search_ranges` and
            :meth:`MethodSpace.default_point`.
    """
    ranges = search_ranges(study, args)
    for method, names in study.methods.items():
        if not names:
            continue
        try:
            space = method_space(method, names, ranges)
        except KeyError as error:
            raise ConfigError(f"study {study.name}: {error.args[0]}") from None
        if study.seed_with_defaults:
            space.default_point()


def search_ranges(study: Study, args: StudyArgs) -> dict[str, tuple[float, float]]:
    """The study's replaced search ranges with the command line's ``--range`` over them.

    Raises:
        ConfigError: a range for a name that none of the study's searches searches.
    """
    ranges = {**{name: (float(low), float(high)) for name, (low, high) in study.ranges.items()},
              **{name: (low, high) for name, low, high in args.ranges}}
    searched = {name for names in study.methods.values() for name in names}
    unknown = sorted(set(ranges) - searched)
    if unknown:
        raise ConfigError(f"study {study.name}: a range for {', '.join(unknown)}, which no search of it searches; "
                          f"it searches {sorted(searched) or 'nothing by name'}")
    return ranges


def _searches(study: Study, base: dict[str, Any], ranges: dict[str, tuple[float, float]] | None = None
              ) -> list[tuple[str, Any, dict[str, Any]]]:
    """(phase name, search space, base config) of each search of the study (``ranges``: replaced ranges)."""
    searches = []
    if study.search_space is not None:
        space_base = base
        if getattr(study.search_space, "chooses_method", False):
            space_base = {k: v for k, v in base.items() if not k.startswith("method.")}
        searches.append(("search", study.search_space, space_base))
    for method, keys in study.methods.items():
        if keys:
            searches.append((f"search-{method}", method_space(method, keys, ranges),
                             _config_for_method(base, method)))
    return searches


def _config_for_method(base: dict[str, Any], method: str) -> dict[str, Any]:
    """``base`` with its method switched to ``method`` (its own defaults, the others' keys dropped)."""
    private = {k: v for k, v in base.items() if k.startswith("_")}
    public = _without_method_params(_public(base), {"method.name": method})
    return {**ExperimentConfig.from_flat({**public, "method.name": method}).to_flat(), **private}


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


def _final_variants(study: Study, base: dict[str, Any], rows: list[TrialRow], final_seeds: int,
                    args: StudyArgs) -> list[dict[str, Any]]:
    """Configurations of the final phase: each search's top-k and every baseline, per seed.

    A baseline equal to a searched best (e.g. a protocol with the default value the search
    found best) runs once: a repeated identical trial would count twice in the mean.
    """
    configs: list[dict[str, Any]] = []
    if final_seeds > 0:
        for phase in sorted({r.phase for r in rows}):
            ranked = sorted((r for r in rows if r.phase == phase and r.best_val_dice == r.best_val_dice),
                            key=lambda r: -r.best_val_dice)
            configs += [r.config for r in ranked[:study.final_top_k]]
        configs += [_public(_config_for_method(base, m)) for m, keys in study.methods.items() if not keys]
    if not args.skip_baselines:
        for baseline in _baselines(study, args):
            method = str(baseline.get("method.name", base["method.name"]))
            configs.append({**_public(_config_for_method(base, method)), **baseline})
    variants: list[dict[str, Any]] = []
    for config in configs:
        for seed in final_phase_seeds(args.seed, final_seeds):
            variant = ExperimentConfig.from_flat({**config, "train.seed": seed}).to_flat()
            if variant not in variants:
                variants.append(variant)
    return variants


@dataclass
class _PhaseContext:
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

    def run_config(self, phase: str, space: Any = None):
        from ray import tune

        return tune.RunConfig(name=f"{self.study.name}-{phase}", storage_path=self.ray_storage,
                              callbacks=[self.callback(phase), NoRetryOfDeterministicErrors(MAX_FAILURES)],
                              failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                              checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                              progress_reporter=_progress_reporter(self.study.metric, space),
                              verbose=1)

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


def _run_search(context: _PhaseContext, phase: str, space: Any, phase_base: dict[str, Any], num_samples: int,
                state: dict) -> list[TrialRow]:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from semiseg.tune.searcher import EpochAwareOptunaSearch

    study, args = context.study, context.args
    path = context.experiment_path(phase)
    if args.resume and tune.Tuner.can_restore(path):
        print(f"resuming {phase} from {redact_uri(path)}", flush=True)
        tuner = tune.Tuner.restore(path, context.trainable(), resume_errored=True, resume_unfinished=True)
    else:
        storage = optuna.storages.RDBStorage(f"sqlite:///{context.study_dir / 'optuna.db'}")
        optuna_name = state.setdefault(f"optuna_study/{phase}",
                                       f"{study.name}-{phase}-{context.parent_run_id or 'local'}")
        sampler = optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=min(study.startup_trials, num_samples),
                                             multivariate=True, constant_liar=True)
        seed_point = space.default_point() if study.seed_with_defaults and hasattr(space, "default_point") else {}
        searcher = EpochAwareOptunaSearch(space=space, metric=study.metric, mode=study.mode, sampler=sampler,
                                          storage=storage, study_name=optuna_name, max_epochs=context.max_epochs,
                                          points_to_evaluate=[seed_point] if seed_point else None)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=context.max_epochs,
                                  grace_period=min(study.grace_period, context.max_epochs),
                                  reduction_factor=study.reduction_factor)
        tuner = tune.Tuner(context.trainable(), param_space=phase_base,
                           tune_config=tune.TuneConfig(
                               search_alg=ConcurrencyLimiter(searcher, context.max_concurrent(num_samples)),
                               scheduler=scheduler, metric=study.metric, mode=study.mode, num_samples=num_samples,
                               trial_dirname_creator=trial_dirname, reuse_actors=context.reuse_actors),
                           run_config=context.run_config(phase, space))
        _save_state(context.study_dir, state)
    results = tuner.fit()
    keys = list(getattr(space, "keys", [])) or _searched_keys(results)
    return rows_from_results(results, phase, keys, context.max_epochs)


def _run_fixed(context: _PhaseContext, phase: str, variants: list[dict[str, Any]],
               shown_keys: list[str]) -> list[TrialRow]:
    """Run fixed configurations to the end (no early stopping), as many at once as fit."""
    from ray import tune

    path = context.experiment_path(phase)
    if context.args.resume and tune.Tuner.can_restore(path):
        print(f"resuming {phase} from {redact_uri(path)}", flush=True)
        tuner = tune.Tuner.restore(path, context.trainable(), resume_errored=True, resume_unfinished=True)
    else:
        param_space = {STORAGE_KEY: context.base[STORAGE_KEY], VARIANT_KEY: tune.grid_search(variants)}
        tuner = tune.Tuner(context.trainable(), param_space=param_space,
                           tune_config=tune.TuneConfig(max_concurrent_trials=context.max_concurrent(len(variants)),
                                                       metric=context.study.metric, mode=context.study.mode,
                                                       trial_dirname_creator=trial_dirname,
                                                       reuse_actors=context.reuse_actors),
                           run_config=context.run_config(phase))
    results = tuner.fit()
    return rows_from_results(results, phase, shown_keys, context.max_epochs)


def _without_method_params(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Drop ``method.*`` keys of ``config`` when ``overrides`` switch to another method."""
    if "method.name" not in overrides or overrides["method.name"] == config.get("method.name"):
        return config
    return {k: v for k, v in config.items() if not k.startswith("method.")}


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _searched_keys(results) -> list[str]:
    keys: set[str] = set()
    configs = [expand_trial_config(r.config or {}) for r in results]
    for key in {k for c in configs for k in c if "." in k and not k.startswith("_")}:
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}
        if len(values) > 1:
            keys.add(key)
    return sorted(keys)


def _summarise(study: Study, tracking_uri: str, parent_run_id: str | None, rows: list[TrialRow]) -> StudyOutcome:
    searched = [r for r in rows if r.phase.startswith("search")]
    final = [r for r in rows if r.phase == "final" and r.status == "completed"]
    return StudyOutcome(study=study.name, tracking_uri=tracking_uri, parent_run_id=parent_run_id, rows=rows,
                        best=best_row(searched), final=final_table(final, group_by=study.group_by),
                        final_val=final_table(final, ("dice",), prefix="val", group_by=study.group_by))


def _report(outcome: StudyOutcome, tracker: Tracker, parent_run_id: str | None, study_dir: Path) -> None:
    keys = sorted({k for r in outcome.rows for k in r.params}, key=lambda k: (k == "train.seed", k))
    print("\n== trials\n" + format_table(outcome.rows, keys), flush=True)
    summary: dict[str, float] = {}
    if outcome.best is not None:
        best = outcome.best
        print(f"\n== best searched trial ({best.method}, {best.trial_id}): val/dice {best.best_val_dice:.4f} "
              f"at epoch {best.best_epoch}, test/dice {best.test_dice:.4f}")
        for key, value in sorted(best.params.items()):
            print(f"   {key} = {value}")
        summary.update({"best/val_dice": best.best_val_dice, "best/test_dice": best.test_dice})
    if outcome.final:
        print("\n== final phase: mean (std) over seeds of the test metrics (whole cases; HD95/ASD in mm)\n"
              + format_final_table(outcome.final))
        for group, metrics in outcome.final.items():
            name = metric_name(group)
            for metric, (mean, std, count) in metrics.items():
                summary[f"final/{name}/{metric}_mean"] = mean
                summary[f"final/{name}/{metric}_std"] = std
            summary[f"final/{name}/val_dice_mean"] = outcome.final_val.get(group, {}).get("dice", (float("nan"),))[0]
        _print_against_supervised(outcome)
    payload = {"study": outcome.study, "tracking_uri": outcome.tracking_uri, "parent_run_id": parent_run_id,
               "summary": summary, "final": outcome.final, "registered_models": outcome.registered_models,
               "trials": [asdict(r) for r in outcome.rows]}
    (study_dir / RESULTS_FILE).write_text(json.dumps(payload, indent=2, default=str))
    if parent_run_id:
        tracker.log_metrics(parent_run_id, {k: v for k, v in summary.items() if v == v}, step=0)
        tracker.log_json(parent_run_id, payload, RESULTS_FILE)
    if outcome.registered_models:
        print("registered models: " + ", ".join(outcome.registered_models))
    print(f"\nresults: {study_dir / RESULTS_FILE}\nMLflow UI: {mlflow_ui_command(outcome.tracking_uri)}\n",
          flush=True)


def _print_against_supervised(outcome: StudyOutcome) -> None:
    """One line per group: does it beat the supervised model of the same group (or the only one)?"""
    supervised = [label for label in outcome.final if label.split(" ", 1)[0] == "supervised"]
    for label, metrics in sorted(outcome.final.items()):
        method, _, group = label.partition(" ")
        if method == "supervised":
            continue
        same_group = f"supervised {group}".strip()
        reference = same_group if same_group in outcome.final else (supervised[0] if len(supervised) == 1 else None)
        if reference is None:
            continue
        ref_test = outcome.final[reference]["dice"][0]
        ref_val = outcome.final_val.get(reference, {}).get("dice", (float("nan"),))[0]
        val = outcome.final_val.get(label, {}).get("dice", (float("nan"),))[0]
        verdict = "beats" if metrics["dice"][0] > ref_test else "does not beat"
        print(f"== {label} {verdict} {reference} on the same labelled cases: test/dice "
              f"{metrics['dice'][0]:.4f} vs {ref_test:.4f} ({metrics['dice'][0] - ref_test:+.4f}), "
              f"val/dice {val:.4f} vs {ref_val:.4f}")


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default embeds the whole config)."""
    return f"trial_{trial.trial_id}"


def _progress_reporter(metric: str, space: Any):
    """Concise progress: epoch, the metric and the loss, plus the searched keys of a search phase."""
    from ray.tune import CLIReporter

    keys = list(getattr(space, "keys", []))
    return CLIReporter(metric_columns={"epoch": "epoch", metric: metric, "train/loss": "train/loss"},
                       parameter_columns=keys, max_report_frequency=30, sort_by_metric=True)


def _load_state(study_dir: Path) -> dict:
    path = study_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(study_dir: Path, state: dict) -> None:
    path = study_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)
