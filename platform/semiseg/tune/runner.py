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

The console (:mod:`semiseg.tune.console`, :mod:`semiseg.tune.progress`): the study's own lines
and one progress line per phase; Ray's and Tune's output goes to ``<state-dir>/<study>/ray.log``
(``--verbose`` shows it as well). When Ray itself stops under the study (its local GCS or raylet
exits, or Tune's loop raises Ray's own error), one line says so with the command that resumes
the study, the traceback goes to that log file, and the study exits with status 3
(:data:`~semiseg.tune.ray_lost.EXIT_RAY_LOST`).

The parts: :mod:`semiseg.tune.checks` (the checks before Ray starts), :mod:`semiseg.tune.configs`
(the configurations a study trains), :mod:`semiseg.tune.phases` (the searches and the final
phase on Tune), :mod:`semiseg.tune.report` (the console output and ``results.json``).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import Any, Sequence

from semiseg.config import ConfigError
from semiseg.data.errors import DatasetError
from semiseg.tracking import (TAG_OPTUNA_STORAGE, TAG_STORAGE_PATH, Tracker, check_tracking_uri, default_tracking_uri,
                              redact_uri, study_tags)
from semiseg.train.contract import DATASET_KEY, STORAGE_KEY
from semiseg.data.splits import SPLITS_FILE, Split, write_splits
from semiseg.tune.checks import check_dataset, check_searches, check_splits, check_trained_configs, search_ranges
from semiseg.tune.cli import StudyArgs, check_paths, parse_args, study_description
from semiseg.tune.console import StudyConsole, study_log_file
from semiseg.tune.configs import budget, public, resolve_base_config, searches, study_baselines, study_methods
from semiseg.tune.local_ray import init_ray
from semiseg.tune.model_export import export_models
from semiseg.tune.model_registry import register_best_models
from semiseg.tune.phases import (PhaseContext, StudyInterruptedError, TrialsFailedError, check_phase, final_variants,
                                 load_state, run_fixed, run_search, save_state)
from semiseg.tune.ray_lost import EXIT_RAY_LOST, LocalRayWatch, RayLostError, ray_lost_line, stop_local_ray
from semiseg.tune.report import StudyOutcome, console_logging, print_banner, report, summarise
from semiseg.tune.resources import ResourceError, TrialRequest, check_cluster_resources, check_local_resources
from semiseg.tune.results import TrialRow
from semiseg.tune.study import Study

log = logging.getLogger("semiseg.study")
EXIT_INPUT_ERROR = 2
EXIT_TRIALS_FAILED = 1
"""Exit status of a study whose searched or final trials all errored."""
EXIT_INTERRUPTED = 130
"""Exit status of a study stopped with Ctrl+C (128 + SIGINT, as a shell reports it)."""


def resume_command(argv: Sequence[str] | None = None) -> str:
    """The command line that continues this study: the same interpreter, script and arguments, with ``--resume``."""
    words = list(sys.argv if argv is None else [sys.argv[0], *argv])
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join([sys.executable, *words])


def run_study(study: Study, argv: Sequence[str] | None = None) -> StudyOutcome:
    """Run ``study`` with the shared CLI and print its results.

    Args:
        study: the study description.
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The outcome (also written as JSON under the study's folder).

    Raises:
        SystemExit: status 2 on input errors (dataset, configuration, impossible resources),
            status 1 when every trial of a phase errored, status 3 when Ray stopped under the
            study and status 130 when stopped with Ctrl+C (both with the command that resumes
            it), after one message.
    """
    import ray

    args = parse_args(f"{study.name}.py", study_description(study), argv)
    console_logging()
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
        layout_name, handover = check_dataset(base, study_baselines(study, args))
        splits = check_splits(base, handover, study_baselines(study, args), args.final_splits)
        base = {**base, DATASET_KEY: handover}
    except (DatasetError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT_ERROR) from None
    with StudyConsole(study_log_file(args.state_dir / study.name), args.verbose) as console:
        try:
            return execute(study, args, base, layout_name, splits, console=console, resume=resume_command(argv))
        except StudyInterruptedError as error:
            if ray.is_initialized() and not ray_was_connected:
                ray.shutdown()
            print(f"stopped during {error}: its finished trials and checkpoints are saved; continue with:\n"
                  f"  {resume_command(argv)}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except (ResourceError, TrialsFailedError) as error:
            if ray.is_initialized() and not ray_was_connected:
                ray.shutdown()
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INPUT_ERROR if isinstance(error, ResourceError) else EXIT_TRIALS_FAILED) from None
        except RayLostError as error:
            console.log_exception(error)
            print(ray_lost_line(error.phase, error.reason, resume_command(argv)), file=sys.stderr, flush=True)
            raise SystemExit(EXIT_RAY_LOST) from None


def execute(study: Study, args: StudyArgs, base: dict[str, Any], dataset_name: str,
            splits: Sequence[Split] = (), console: StudyConsole | None = None, resume: str = "") -> StudyOutcome:
    """Run the phases of a validated study and print the report.

    ``splits``: the final phase's splits (:func:`~semiseg.tune.checks.check_splits`), written to
    the study's folder as ``splits_final.json`` (``--splits`` takes that file back).
    ``console``: the study's console set-up (told when Ray has started); ``resume``: the command
    that resumes the study, printed if its local Ray stops under it.
    """
    import ray

    study_dir = args.state_dir / study.name
    study_dir.mkdir(parents=True, exist_ok=True)
    if splits:
        write_splits(study_dir / SPLITS_FILE, splits)
    base = {**base, STORAGE_KEY: f"{args.storage_path.rstrip('/')}/ray"}
    state = load_state(study_dir) if args.resume else {}
    started_ray = not ray.is_initialized()
    if started_ray and (dashboard := init_ray(args.address)):
        log.info("Ray dashboard: %s", dashboard)
    if console is not None:
        console.ray_started()
    check_cluster_resources(TrialRequest.from_args(args))
    joined_cluster = not started_ray or bool(args.address or os.environ.get("RAY_ADDRESS"))
    context = _start_tracking(study, args, base, dataset_name, state, joined_cluster)
    watch = LocalRayWatch(resume, lambda: context.running_phase)
    if started_ray and not joined_cluster:
        watch.start()
    try:
        return _run_phases(study, args, base, dataset_name, splits, context, console)
    except RayLostError:
        if started_ray and not joined_cluster:
            stop_local_ray()  # what is left of it: ray.shutdown would wait for the lost GCS
        raise
    finally:
        watch.stop()
        if started_ray and ray.is_initialized():
            ray.shutdown()


def _run_phases(study: Study, args: StudyArgs, base: dict[str, Any], dataset_name: str, splits: Sequence[Split],
                context: PhaseContext, console: StudyConsole | None) -> StudyOutcome:
    """The searches, the final phase and the report of a study whose Ray and tracking are up."""
    study_dir = context.study_dir
    study_searches = searches(study, base, search_ranges(study, args))
    num_samples, final_seeds = budget(study, args)
    print_banner(study, dataset_name, len(study_searches), num_samples, context.max_epochs, final_seeds,
                 context.tracker.display_uri, console.log_file if console else None, args.verbose)

    rows: list[TrialRow] = []
    for search in study_searches:
        rows += run_search(context, search, num_samples)
        check_phase(context, search.phase, rows)
    variants = final_variants(study, base, rows, final_seeds, args, final_splits=max(1, len(splits)))
    if variants:
        shown = sorted({k for search in study_searches for k in search.space.keys} | set(study.group_by))
        split_key = ["data.split"] if len(splits) > 1 else []
        rows += run_fixed(context, "final", variants, shown + split_key + ["train.seed"])
        check_phase(context, "final", rows)

    outcome = summarise(study, context.tracker.display_uri, context.parent_run_id, rows,
                        spaces={search.phase: search.space for search in study_searches})
    outcome.experiment_id = context.experiment_id
    outcome.registered_models = register_best_models(rows, context.tracker, context.experiment_id, study.name)
    outcome.models_index = export_models(rows, study_dir, study.name, study.group_by, context.tracker,
                                         context.experiment_id)
    report(outcome, context.tracker, context.parent_run_id, study_dir)
    if context.parent_run_id:
        context.tracker.end_run(context.parent_run_id, "FINISHED")
    context.state["finished"] = True
    context.save_state()
    return outcome


def _start_tracking(study: Study, args: StudyArgs, base: dict[str, Any], dataset_name: str, state: dict,
                    joined_cluster: bool) -> PhaseContext:
    """Reach MLflow, start the study's parent run (or take the resumed one's) and save the state."""
    study_dir = args.state_dir / study.name
    tracking_uri = args.tracking_uri or default_tracking_uri(args.state_dir)
    tracker = Tracker(tracking_uri, artifact_root=args.state_dir / "mlartifacts")
    tracker.reachable()
    experiment_id = tracker.experiment_id(study.name)
    parent_run_id = state.get("parent_run_id")
    if parent_run_id is None and experiment_id is not None:
        tags = {**study_tags(study.name, study_methods(study, base), dataset_name),
                TAG_OPTUNA_STORAGE: f"sqlite:///{study_dir / 'optuna.db'}",
                TAG_STORAGE_PATH: redact_uri(args.storage_path)}
        parent_run_id = tracker.start_run(experiment_id, study.name, tags)
        if parent_run_id:
            tracker.log_params(parent_run_id, public(base))
    # for people only (a resumed study takes the URI from its command line again): never the secrets
    state.update({"parent_run_id": parent_run_id, "tracking_uri": redact_uri(tracking_uri)})
    save_state(study_dir, state)
    return PhaseContext(study, args, base, tracker, experiment_id, parent_run_id, dataset_name,
                        int(base["train.max_epochs"]), args.state_dir, study_dir, base[STORAGE_KEY],
                        joined_cluster=joined_cluster, state=state)
