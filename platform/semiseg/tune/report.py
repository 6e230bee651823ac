"""What a study prints and writes: the console set-up, the banner, Tune's progress lines,
the errored trials of a phase, and the closing report (``results.json``, the parent run's
summary metrics in MLflow).

The closing report's verdict is the paired comparison of each method with the supervised
model of the same labelled cases (:func:`semiseg.report.stats.verdict`, the sentence the HTML
report shows too): the mean difference of test Dice over runs paired by split and seed, its
95 % interval, the test and its p-value, and "no evidence of a difference" when the interval
contains 0 — never a winner from means alone.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from semiseg.report.stats import Comparison, verdict
from semiseg.tracking import Tracker, metric_name, mlflow_ui_hint, venv_executable
from semiseg.tune.range_edges import range_edges
from semiseg.tune.results import (FinalTable, TrialRow, best_row, final_comparisons, final_table, first_error_line,
                                  format_final_table, format_per_class_table, format_table, per_class_table,
                                  per_split_table, postprocessed_table, split_count)
from semiseg.tune.space import SearchSpace
from semiseg.tune.study import Study

RESULTS_FILE = "results.json"


@dataclass
class StudyOutcome:
    """What a finished study returns (and writes to ``results.json``)."""

    study: str
    tracking_uri: str  # redacted (secrets as ***): it is printed and written to results.json
    parent_run_id: str | None
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    final: FinalTable = field(default_factory=dict)
    final_val: FinalTable = field(default_factory=dict)
    final_per_class: FinalTable = field(default_factory=dict)
    """Per-class test Dice and HD95 (``dice/<label>``, ``hd95/<label>``); empty for binary data."""
    final_postprocessed: FinalTable = field(default_factory=dict)
    """Test Dice and HD95 without and with post-processing; empty when no run post-processed."""
    final_splits: int = 1
    """How many labelled splits the final phase ran on."""
    final_per_split: FinalTable = field(default_factory=dict)
    """Test Dice per split (mean (std) over its seeds); empty with one split."""
    comparisons: list[Comparison] = field(default_factory=list)
    range_warnings: list[dict[str, Any]] = field(default_factory=list)
    """Best searched values at an edge of their range (:meth:`RangeEdge.to_dict` plus ``phase``)."""
    registered_models: list[str] = field(default_factory=list)
    experiment_id: str | None = None
    """The study's MLflow experiment (None when tracking is off): the UI hint links its runs."""
    models_index: Path | None = None
    """The study's kept models (``models/index.json``, :mod:`semiseg.tune.model_export`), None when none."""


def console_logging() -> None:
    """Progress lines (INFO) to stdout, warnings and errors to stderr: stderr holds only what needs attention."""
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    attention = logging.StreamHandler(sys.stderr)
    attention.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[progress, attention])


def print_banner(study: Study, dataset_name: str, searches: int, num_samples: int, max_epochs: int,
                 final_seeds: int, tracking_uri: str, log_file: Path | None = None, verbose: bool = False) -> None:
    """The study's opening lines (``tracking_uri`` redacted), with the path of its log file (Ray's and Tune's
    output)."""
    logs = ""
    if log_file is not None:
        logs = f"\n   Ray's and Tune's logs: {log_file}" + ("" if verbose else " (--verbose shows them here)")
    print(f"\n== study {study.name}: {study.description}\n   dataset {dataset_name}; "
          f"{searches} search(es) of {num_samples} trials, {max_epochs} epochs each; "
          f"final phase with {max(1, final_seeds)} seed(s); MLflow {tracking_uri}{logs}\n", flush=True)


def progress_reporter(phase: str, metric: str, mode: str, keys: Sequence[str], max_epochs: int,
                      verbose: bool = False, shown_errors: set[str] | None = None):
    """The phase's progress on the console: :class:`~semiseg.tune.progress.StudyProgress` (one line per
    phase, see :mod:`semiseg.tune.progress`; it adds the ids of the errored trials it printed to
    ``shown_errors``); with ``verbose``, Tune's own status tables with the epoch, the metric, the loss
    and the searched ``keys``."""
    if not verbose:
        from semiseg.tune.progress import StudyProgress

        return StudyProgress(phase, metric, mode, keys, max_epochs, reported_errors=shown_errors)
    from ray.tune import CLIReporter

    return CLIReporter(metric_columns={"epoch": "epoch", metric: metric, "train/loss": "train/loss"},
                       parameter_columns=list(keys), max_report_frequency=30, sort_by_metric=True)


def print_errored(phase: str, errored: list[TrialRow], trials: int, already_shown: Collection[str] = ()) -> None:
    """The count of errored trials of ``phase`` (of ``trials``), then a line for each not in ``already_shown``
    (the ids whose line the progress reporter printed when they errored)."""
    print(f"\n== {phase}: {len(errored)} of {trials} trial(s) errored", flush=True)
    for row in errored:
        if row.trial_id not in already_shown:
            print(f"   {first_error_line([row])}", flush=True)


def summarise(study: Study, tracking_uri: str, parent_run_id: str | None, rows: list[TrialRow],
              spaces: Mapping[str, SearchSpace] | None = None) -> StudyOutcome:
    """The outcome of ``rows``: the best searched trial, the final phase's tables and paired comparisons.

    Args:
        study: the study.
        tracking_uri: the redacted MLflow URI.
        parent_run_id: the study's parent run.
        rows: every trial.
        spaces: ``phase name -> search space`` of the study's searches; with them, the best
            trial of each search is checked for values at the edge of its range. None: no check.
    """
    searched = [r for r in rows if r.phase.startswith("search")]
    final = [r for r in rows if r.phase == "final" and r.status == "completed"]
    table = final_table(final, group_by=study.group_by)
    return StudyOutcome(study=study.name, tracking_uri=tracking_uri, parent_run_id=parent_run_id, rows=rows,
                        best=best_row(searched), final=table,
                        final_val=final_table(final, ("dice",), prefix="val", group_by=study.group_by),
                        final_per_class=per_class_table(final, study.group_by),
                        final_postprocessed=postprocessed_table(final, study.group_by),
                        final_splits=split_count(final) if final else 1,
                        final_per_split=per_split_table(final, group_by=study.group_by),
                        comparisons=final_comparisons(final, table, study.group_by),
                        range_warnings=edge_records(rows, spaces or {}))


def edge_records(rows: Sequence[TrialRow], spaces: Mapping[str, SearchSpace]) -> list[dict[str, Any]]:
    """The range edges of the best trial of each search (see :mod:`semiseg.tune.range_edges`)."""
    records = []
    for phase, space in spaces.items():
        best = best_row([r for r in rows if r.phase == phase])
        if best is not None:
            records += [{"phase": phase, **edge.to_dict()} for edge in range_edges(space, best.params)]
    return records


def report(outcome: StudyOutcome, tracker: Tracker, parent_run_id: str | None, study_dir: Path,
           spaces: Mapping[str, SearchSpace] | None = None) -> None:
    """Print the tables and the verdicts, write ``results.json`` and log the summary to the parent run.

    Args:
        spaces: as for :func:`summarise`; given here, they replace the outcome's range warnings.
    """
    if spaces is not None:
        outcome.range_warnings = edge_records(outcome.rows, spaces)
    keys = sorted({k for r in outcome.rows for k in r.params}, key=lambda k: (k == "train.seed", k))
    print("\n== trials\n" + format_table(outcome.rows, keys), flush=True)
    summary: dict[str, float] = {}
    if outcome.best is not None:
        summary.update(_print_best(outcome.best))
    print_range_warnings(outcome.range_warnings)
    if outcome.final:
        print_final_tables(outcome)
        summary.update(_final_summary(outcome))
        print_verdicts(outcome.comparisons)
    payload = {"study": outcome.study, "tracking_uri": outcome.tracking_uri, "parent_run_id": parent_run_id,
               "summary": summary, "final": outcome.final, "final_per_class": outcome.final_per_class,
               "final_postprocessed": outcome.final_postprocessed, "final_splits": outcome.final_splits,
               "final_per_split": outcome.final_per_split,
               "comparisons": [c.to_dict() for c in outcome.comparisons],
               "range_warnings": outcome.range_warnings, "registered_models": outcome.registered_models,
               "models_index": str(outcome.models_index) if outcome.models_index else None,
               "trials": [asdict(r) for r in outcome.rows]}
    (study_dir / RESULTS_FILE).write_text(json.dumps(payload, indent=2, default=str))
    if parent_run_id:
        tracker.log_metrics(parent_run_id, {k: v for k, v in summary.items() if v == v}, step=0)
        tracker.log_json(parent_run_id, payload, RESULTS_FILE)
    if outcome.registered_models:
        print("registered models: " + ", ".join(outcome.registered_models))
    if outcome.models_index is not None:
        print(f"models: {outcome.models_index}\nsegment new scans: {predict_command(study_dir)}")
    hint = mlflow_ui_hint(outcome.tracking_uri, outcome.experiment_id)
    print(f"\nresults: {study_dir / RESULTS_FILE}\nMLflow UI: {hint}\n", flush=True)


def predict_command(study_dir: Path) -> str:
    """The ``semiseg-predict`` command line for a study's models, with the executable beside this Python's
    (the virtual environment's) when it is there, so that it works as printed."""
    return shlex.join([venv_executable("semiseg-predict"), "--model", str(study_dir), "--input", "IMAGES_DIR",
                       "--output", "OUTPUT_DIR"])


def over_runs(outcome: StudyOutcome) -> str:
    """``splits × seeds`` when the final phase ran on several labelled splits, else ``seeds``."""
    return "splits × seeds" if outcome.final_splits > 1 else "seeds"


def print_final_tables(outcome: StudyOutcome) -> None:
    """The final table, then the per-class and post-processed tables when the runs have them."""
    over = over_runs(outcome)
    print(f"\n== final phase: mean (std) over {over} of the test metrics (whole cases; HD95/ASD in mm)\n"
          + format_final_table(outcome.final, {"hd95": 2, "asd": 2}))
    if outcome.final_per_class:
        print(f"\n== per class: mean (std) over {over} of test Dice / HD95 (mm)\n"
              + format_per_class_table(outcome.final_per_class))
    if outcome.final_per_split:
        print("\n== per split (labelled and validation cases drawn again, same test cases): test Dice, "
              "mean (std) over seeds\n" + format_final_table(outcome.final_per_split))
    if outcome.final_postprocessed:
        print(f"\n== post-processing (largest component where validation chose it): mean (std) over {over}, "
              "test Dice and HD95 (mm) without and with it (pp)\n"
              + format_final_table(outcome.final_postprocessed, {"hd95": 2, "hd95 (pp)": 2}))


def print_range_warnings(warnings: Sequence[Mapping[str, Any]]) -> None:
    """One line per best searched value at the edge of its range (prefixed by its search when several)."""
    if not warnings:
        return
    phases = {w["phase"] for w in warnings}
    print("\n== edge of a searched range: the optimum may lie outside it")
    for warning in warnings:
        prefix = f"{warning['phase']}: " if len(phases) > 1 else ""
        print(f"   {prefix}{warning['message']}", flush=True)


def print_verdicts(comparisons: Sequence[Comparison]) -> None:
    """One line per comparison: the paired verdict against supervised (:func:`semiseg.report.stats.verdict`)."""
    if comparisons:
        print()
    for comparison in comparisons:
        print(f"== {verdict(comparison)}", flush=True)


def _print_best(best: TrialRow) -> dict[str, float]:
    """Print the best searched trial; return its summary metrics."""
    print(f"\n== best searched trial ({best.method}, {best.trial_id}): val/dice {best.best_val_dice:.4f} "
          f"at epoch {best.best_epoch}, test/dice {best.test_dice:.4f}")
    for key, value in sorted(best.params.items()):
        print(f"   {key} = {value}")
    return {"best/val_dice": best.best_val_dice, "best/test_dice": best.test_dice}


def _final_summary(outcome: StudyOutcome) -> dict[str, float]:
    """The final phase's summary metrics: mean and std of each test metric and the mean val/dice, per group,
    and each comparison's mean Dice difference, interval and p-value."""
    summary: dict[str, float] = {}
    for group, metrics in outcome.final.items():
        name = metric_name(group)
        for metric, (mean, std, count) in metrics.items():
            summary[f"final/{name}/{metric}_mean"] = mean
            summary[f"final/{name}/{metric}_std"] = std
        summary[f"final/{name}/val_dice_mean"] = outcome.final_val.get(group, {}).get("dice", (float("nan"),))[0]
    for comparison in outcome.comparisons:
        name, test = metric_name(comparison.method), comparison.test
        summary.update({f"final/{name}/dice_difference": test.mean_difference,
                        f"final/{name}/dice_difference_ci_low": test.ci_low,
                        f"final/{name}/dice_difference_ci_high": test.ci_high,
                        f"final/{name}/dice_difference_p_value": test.p_value})
    return summary
