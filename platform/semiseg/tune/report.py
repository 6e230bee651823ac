"""What a study prints and writes: the console set-up, the banner, Tune's progress lines,
the errored trials of a phase, and the closing report (``results.json``, the parent run's
summary metrics in MLflow).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from semiseg.tracking import Tracker, metric_name, mlflow_ui_command
from semiseg.tune.results import TrialRow, best_row, final_table, first_error_line, format_final_table, format_table
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
    final: dict[str, dict[str, tuple[float, float, int]]] = field(default_factory=dict)
    final_val: dict[str, dict[str, tuple[float, float, int]]] = field(default_factory=dict)
    registered_models: list[str] = field(default_factory=list)


def console_logging() -> None:
    """Progress lines (INFO) to stdout, warnings and errors to stderr: stderr holds only what needs attention."""
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    attention = logging.StreamHandler(sys.stderr)
    attention.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[progress, attention])


def print_banner(study: Study, dataset_name: str, searches: int, num_samples: int, max_epochs: int,
                 final_seeds: int, tracking_uri: str) -> None:
    """The study's opening lines (``tracking_uri`` redacted)."""
    print(f"\n== study {study.name}: {study.description}\n   dataset {dataset_name}; "
          f"{searches} search(es) of {num_samples} trials, {max_epochs} epochs each; "
          f"final phase with {max(1, final_seeds)} seed(s); MLflow {tracking_uri}\n", flush=True)


def progress_reporter(metric: str, keys: Sequence[str] = ()):
    """Concise progress: epoch, the metric and the loss, plus the searched ``keys`` of a search phase."""
    from ray.tune import CLIReporter

    return CLIReporter(metric_columns={"epoch": "epoch", metric: metric, "train/loss": "train/loss"},
                       parameter_columns=list(keys), max_report_frequency=30, sort_by_metric=True)


def print_errored(phase: str, errored: list[TrialRow], trials: int) -> None:
    """A line per errored trial of ``phase`` (of ``trials``)."""
    print(f"\n== {phase}: {len(errored)} of {trials} trial(s) errored", flush=True)
    for row in errored:
        print(f"   {first_error_line([row])}", flush=True)


def summarise(study: Study, tracking_uri: str, parent_run_id: str | None, rows: list[TrialRow]) -> StudyOutcome:
    """The outcome of ``rows``: the best searched trial and the final phase's mean (std) per group."""
    searched = [r for r in rows if r.phase.startswith("search")]
    final = [r for r in rows if r.phase == "final" and r.status == "completed"]
    return StudyOutcome(study=study.name, tracking_uri=tracking_uri, parent_run_id=parent_run_id, rows=rows,
                        best=best_row(searched), final=final_table(final, group_by=study.group_by),
                        final_val=final_table(final, ("dice",), prefix="val", group_by=study.group_by))


def report(outcome: StudyOutcome, tracker: Tracker, parent_run_id: str | None, study_dir: Path) -> None:
    """Print the tables, write ``results.json`` and log the summary to the parent run."""
    keys = sorted({k for r in outcome.rows for k in r.params}, key=lambda k: (k == "train.seed", k))
    print("\n== trials\n" + format_table(outcome.rows, keys), flush=True)
    summary: dict[str, float] = {}
    if outcome.best is not None:
        summary.update(_print_best(outcome.best))
    if outcome.final:
        print("\n== final phase: mean (std) over seeds of the test metrics (whole cases; HD95/ASD in mm)\n"
              + format_final_table(outcome.final))
        summary.update(_final_summary(outcome))
        print_against_supervised(outcome)
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


def _print_best(best: TrialRow) -> dict[str, float]:
    """Print the best searched trial; return its summary metrics."""
    print(f"\n== best searched trial ({best.method}, {best.trial_id}): val/dice {best.best_val_dice:.4f} "
          f"at epoch {best.best_epoch}, test/dice {best.test_dice:.4f}")
    for key, value in sorted(best.params.items()):
        print(f"   {key} = {value}")
    return {"best/val_dice": best.best_val_dice, "best/test_dice": best.test_dice}


def _final_summary(outcome: StudyOutcome) -> dict[str, float]:
    """The final phase's summary metrics: mean and std of each test metric and the mean val/dice, per group."""
    summary: dict[str, float] = {}
    for group, metrics in outcome.final.items():
        name = metric_name(group)
        for metric, (mean, std, count) in metrics.items():
            summary[f"final/{name}/{metric}_mean"] = mean
            summary[f"final/{name}/{metric}_std"] = std
        summary[f"final/{name}/val_dice_mean"] = outcome.final_val.get(group, {}).get("dice", (float("nan"),))[0]
    return summary


def print_against_supervised(outcome: StudyOutcome) -> None:
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
