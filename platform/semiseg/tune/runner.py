"""Run a study: validate the data, start or join Ray, search, run baselines, report.

Phases of one invocation (one MLflow parent run):

1. the searched trials: Ray Tune with Optuna's TPE (seeded, in an RDB storage so the
   study can resume) behind a concurrency limit, and ASHA on the reported ``epoch``;
2. the baselines: fixed configurations (e.g. the supervised model on the same labelled
   cases), one trial per seed, so the comparison at the end has a spread.

Input errors (a missing or malformed dataset, a bad config key) print one clear message
and exit with status 2, without a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from semiseg.config import ConfigError, ExperimentConfig
from semiseg.data.errors import DatasetError
from semiseg.data.layout import validate_layout
from semiseg.data.source import PHANTOM, resolve_dataset
from semiseg.data.splits import make_split
from semiseg.tracking import (Tracker, default_tracking_uri, mlflow_ui_command, study_tags)
from semiseg.tune.cli import StudyArgs, parse_args
from semiseg.tune.results import TrialRow, best_row, format_table, mean_std, rows_from_results
from semiseg.tune.study import Study
from semiseg.train.loop import VARIANT_KEY, expand_trial_config
from semiseg.tune.trainables import STORAGE_KEY, make_trainable

log = logging.getLogger("semiseg.study")
STATE_FILE = "study_state.json"
RESULTS_FILE = "results.json"
EXIT_INPUT_ERROR = 2


@dataclass
class StudyOutcome:
    """What a finished study returns (and writes to ``results.json``)."""

    study: str
    tracking_uri: str
    parent_run_id: str | None
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    baseline_val_dice: tuple[float, float] = (float("nan"), float("nan"))
    baseline_test_dice: tuple[float, float] = (float("nan"), float("nan"))


def run_study(study: Study, argv: Sequence[str] | None = None) -> StudyOutcome:
    """Run ``study`` with the shared CLI and print its results.

    Args:
        study: the study description.
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The outcome (also written as JSON under the study's folder).

    Raises:
        SystemExit: status 2 on input errors (dataset, configuration), after one message.
    """
    args = parse_args(f"{study.name}.py", study.description, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        base = resolve_base_config(study, args)
        layout_name = check_dataset(base)
    except (DatasetError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT_ERROR) from None
    return execute(study, args, base, layout_name)


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


def check_dataset(base: dict[str, Any]) -> str:
    """Read and validate the dataset once on the driver, and check the split budget.

    Returns:
        The dataset's name (for tags).

    Raises:
        DatasetError: naming the file and the problem.
    """
    cfg = ExperimentConfig.from_flat(base)
    layout = resolve_dataset(cfg.data)
    if cfg.data.dataset != PHANTOM:
        log.info("validating %d training cases of %s ...", len(layout.training), layout.root)
        validate_layout(layout)
    make_split(layout.labelled_ids, layout.unlabelled_ids, num_labelled=cfg.data.num_labelled,
               num_validation=cfg.data.num_validation, num_test=cfg.data.num_test, seed=cfg.data.split_seed)
    return layout.name


def execute(study: Study, args: StudyArgs, base: dict[str, Any], dataset_name: str) -> StudyOutcome:
    """Run the phases of a validated study and print the report."""
    import ray

    runs_root = args.storage_path
    study_dir = runs_root / study.name
    study_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or default_tracking_uri(runs_root)
    max_epochs = int(base["train.max_epochs"])
    num_samples = args.num_samples or (study.smoke_num_samples if args.smoke else study.num_samples)
    base = {**base, STORAGE_KEY: str(runs_root / "ray")}
    state = _load_state(study_dir) if args.resume else {}

    started_ray = not ray.is_initialized()
    if started_ray:
        _init_ray(args.address)
    tracker = Tracker(tracking_uri, artifact_root=runs_root / "mlartifacts")
    experiment_id = tracker.experiment_id(study.name)
    parent_run_id = state.get("parent_run_id")
    if parent_run_id is None and experiment_id is not None:
        methods = [str(base["method.name"])] + [str(b.get("method.name", base["method.name"]))
                                                for b in study.baselines]
        parent_run_id = tracker.start_run(experiment_id, f"{study.name}", study_tags(study.name, methods, dataset_name))
        if parent_run_id:
            tracker.log_params(parent_run_id, {k: v for k, v in base.items() if not k.startswith("_")})
    state.update({"parent_run_id": parent_run_id, "tracking_uri": tracking_uri})
    _save_state(study_dir, state)
    print(f"\n== study {study.name}: {study.description}\n   dataset {dataset_name}, "
          f"{num_samples} searched trials x {max_epochs} epochs, MLflow {tracking_uri}\n", flush=True)

    context = _PhaseContext(study, args, base, tracker, experiment_id, parent_run_id, dataset_name,
                            max_epochs, runs_root, study_dir)
    rows: list[TrialRow] = []
    if study.search_space is not None:
        rows += _run_search(context, num_samples, state)
    baseline_rows: list[TrialRow] = []
    if study.baselines and not args.skip_baselines:
        baseline_rows = _run_baselines(context, state)
        rows += baseline_rows

    outcome = _summarise(study, tracking_uri, parent_run_id, rows, baseline_rows)
    _report(outcome, study, tracker, parent_run_id, study_dir)
    if parent_run_id:
        tracker.end_run(parent_run_id, "FINISHED")
    state["finished"] = True
    _save_state(study_dir, state)
    if started_ray:
        ray.shutdown()
    return outcome


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

    def callback(self, phase: str):
        from semiseg.tune.callbacks import MlflowTrialCallback

        return MlflowTrialCallback(self.tracker, self.experiment_id, self.parent_run_id, self.study.name, phase,
                                   self.dataset_name, self.max_epochs)

    def run_config(self, phase: str):
        from ray import tune

        return tune.RunConfig(name=f"{self.study.name}-{phase}", storage_path=str(self.runs_root / "ray"),
                              callbacks=[self.callback(phase)],
                              failure_config=tune.FailureConfig(max_failures=2),
                              checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                              progress_reporter=_progress_reporter(self.study, phase),
                              verbose=1)

    def trainable(self):
        return make_trainable(self.args.workers_per_trial, self.args.cpus_per_worker, self.args.gpus_per_worker)

    def max_concurrent(self) -> int:
        if self.args.max_concurrent:
            return self.args.max_concurrent
        import ray

        resources = ray.cluster_resources()
        per_trial_cpu = self.args.cpus_per_worker * self.args.workers_per_trial
        slots = int(resources.get("CPU", 1) // per_trial_cpu)
        if self.args.gpus_per_worker > 0:
            per_trial_gpu = self.args.gpus_per_worker * self.args.workers_per_trial
            slots = min(slots, int(resources.get("GPU", 0) // per_trial_gpu + 1e-9))
        return max(1, slots)


def _run_search(context: _PhaseContext, num_samples: int, state: dict) -> list[TrialRow]:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from semiseg.tune.searcher import EpochAwareOptunaSearch

    study, args = context.study, context.args
    phase = "search"
    path = context.runs_root / "ray" / f"{study.name}-{phase}"
    trainable = context.trainable()
    if args.resume and tune.Tuner.can_restore(str(path)):
        print(f"resuming the search from {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, resume_unfinished=True)
    else:
        storage = optuna.storages.RDBStorage(f"sqlite:///{context.study_dir / 'optuna.db'}")
        run_tag = state.setdefault("optuna_study", f"{study.name}-{context.parent_run_id or 'local'}")
        sampler = optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=min(study.startup_trials, num_samples),
                                             multivariate=True, constant_liar=True)
        searcher = EpochAwareOptunaSearch(space=study.search_space, metric=study.metric, mode=study.mode,
                                          sampler=sampler, storage=storage, study_name=run_tag,
                                          max_epochs=context.max_epochs)
        concurrency = context.max_concurrent()
        scheduler = ASHAScheduler(time_attr="epoch", max_t=context.max_epochs,
                                  grace_period=min(study.grace_period, context.max_epochs),
                                  reduction_factor=study.reduction_factor)
        tuner = tune.Tuner(trainable, param_space=context.base,
                           tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, concurrency),
                                                       scheduler=scheduler, metric=study.metric, mode=study.mode,
                                                       num_samples=num_samples,
                                                       trial_dirname_creator=trial_dirname),
                           run_config=context.run_config(phase))
        _save_state(context.study_dir, state)
    results = tuner.fit()
    searched = _searched_keys(results)
    return rows_from_results(results, phase, searched, context.max_epochs)


def _run_baselines(context: _PhaseContext, state: dict) -> list[TrialRow]:
    from ray import tune

    study, args = context.study, context.args
    phase = "baseline"
    path = context.runs_root / "ray" / f"{study.name}-{phase}"
    trainable = context.trainable()
    if args.resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, resume_unfinished=True)
    else:
        seeds = study.smoke_baseline_seeds if args.smoke else study.baseline_seeds
        variants = [ExperimentConfig.from_flat({**_without_method_params(_public(context.base), baseline),
                                                **baseline, "train.seed": args.seed + offset}).to_flat()
                    for baseline in study.baselines for offset in range(seeds)]
        tuner = tune.Tuner(trainable,
                           param_space={STORAGE_KEY: context.base[STORAGE_KEY], VARIANT_KEY: tune.grid_search(variants)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=context.max_concurrent(),
                                                       metric=study.metric, mode=study.mode,
                                                       trial_dirname_creator=trial_dirname),
                           run_config=context.run_config(phase))
    results = tuner.fit()
    return rows_from_results(results, phase, ["train.seed"], context.max_epochs)


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
    for key in {k for c in configs for k in c if "." in k}:
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}
        if len(values) > 1:
            keys.add(key)
    return sorted(keys)


def _summarise(study: Study, tracking_uri: str, parent_run_id: str | None, rows: list[TrialRow],
               baseline_rows: list[TrialRow]) -> StudyOutcome:
    searched = [r for r in rows if r.phase == "search"]
    return StudyOutcome(study=study.name, tracking_uri=tracking_uri, parent_run_id=parent_run_id, rows=rows,
                        best=best_row(searched),
                        baseline_val_dice=mean_std([r.best_val_dice for r in baseline_rows]),
                        baseline_test_dice=mean_std([r.test_dice for r in baseline_rows]))


def _report(outcome: StudyOutcome, study: Study, tracker: Tracker, parent_run_id: str | None,
            study_dir: Path) -> None:
    keys = sorted({k for r in outcome.rows for k in r.params})
    print("\n== trials\n" + format_table(outcome.rows, keys), flush=True)
    summary: dict[str, float] = {}
    if outcome.best is not None:
        best = outcome.best
        print(f"\n== best searched configuration ({best.method}, trial {best.trial_id}): "
              f"val/dice {best.best_val_dice:.4f} at epoch {best.best_epoch}, test/dice {best.test_dice:.4f}")
        for key, value in sorted(best.params.items()):
            print(f"   {key} = {value}")
        summary.update({"best/val_dice": best.best_val_dice, "best/test_dice": best.test_dice})
    mean_val, std_val = outcome.baseline_val_dice
    mean_test, std_test = outcome.baseline_test_dice
    if mean_val == mean_val:
        print(f"== baseline ({', '.join(sorted({r.method for r in outcome.rows if r.phase == 'baseline'}))}, "
              f"same labelled cases): val/dice {mean_val:.4f} ± {std_val:.4f}, "
              f"test/dice {mean_test:.4f} ± {std_test:.4f}")
        summary.update({"baseline/val_dice": mean_val, "baseline/test_dice": mean_test})
        if outcome.best is not None:
            print(f"== best searched minus baseline: val/dice {outcome.best.best_val_dice - mean_val:+.4f}, "
                  f"test/dice {outcome.best.test_dice - mean_test:+.4f}")
    payload = {"study": outcome.study, "tracking_uri": outcome.tracking_uri, "parent_run_id": parent_run_id,
               "summary": summary, "trials": [asdict(r) for r in outcome.rows]}
    (study_dir / RESULTS_FILE).write_text(json.dumps(payload, indent=2, default=str))
    if parent_run_id:
        tracker.log_metrics(parent_run_id, {k: v for k, v in summary.items() if v == v}, step=0)
        tracker.log_json(parent_run_id, payload, RESULTS_FILE)
    print(f"\nresults: {study_dir / RESULTS_FILE}\nMLflow UI: {mlflow_ui_command(outcome.tracking_uri)}\n",
          flush=True)


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default embeds the whole config)."""
    return f"trial_{trial.trial_id}"


def _progress_reporter(study: Study, phase: str):
    """Concise progress: epoch, the metric and the loss, plus the searched keys in the search phase."""
    from ray.tune import CLIReporter

    keys = [f"method.{k}" for k in getattr(study.search_space, "keys", [])] if phase == "search" else []
    return CLIReporter(metric_columns={"epoch": "epoch", study.metric: study.metric, "train/loss": "train/loss"},
                       parameter_columns=keys, max_report_frequency=30, sort_by_metric=True)


def _init_ray(address: str | None) -> None:
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=True,
                 logging_level=logging.WARNING)


def _load_state(study_dir: Path) -> dict:
    path = study_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(study_dir: Path, state: dict) -> None:
    path = study_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)
