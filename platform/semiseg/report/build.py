"""Assemble one study's report: tables, figures, overlays and notes, ready to render."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from semiseg.report import figures
from semiseg.report.search import SearchedParam, SearchInfo, read_searches, searched_by_method
from semiseg.report.stats import CostRow, MethodRow, cost_rows, method_rows
from semiseg.report.store import StudyRecord, TrialRun

OVERLAY_ARTIFACT = "overlay.png"
LABEL_KEY = "data.num_labelled"
MIN_IMPORTANCE_PARAMS = 2
"""Parameters a search needs for its importances to say anything (one parameter always has importance 1)."""
ArtifactReader = Callable[[str, str], "bytes | None"]


@dataclass(frozen=True)
class FigureView:
    """A figure (PNG bytes) or, when there is nothing to draw, the note saying why."""

    title: str
    png: bytes | None
    note: str = ""


@dataclass(frozen=True)
class OverlayView:
    """The prediction overlay of a method's best trial (None when the run has none)."""

    method: str
    trial: TrialRun
    png: bytes | None


@dataclass(frozen=True)
class StudyView:
    """Everything the HTML page shows of one study."""

    record: StudyRecord
    rows: Sequence[MethodRow] = ()
    costs: Sequence[CostRow] = ()
    figures: Sequence[FigureView] = ()
    overlays: Sequence[OverlayView] = ()
    searched: Mapping[str, Sequence[SearchedParam]] = field(default_factory=dict)
    search_note: str = ""
    notes: Sequence[str] = field(default_factory=tuple)
    range_warnings: Sequence[str] = field(default_factory=tuple)


def build_study_view(record: StudyRecord, read_artifact: ArtifactReader) -> StudyView:
    """Compute the tables, draw the figures and fetch the overlays of one study.

    Args:
        record: the study as read from the store.
        read_artifact: ``(run_id, path) -> bytes | None`` (e.g. ``ReportStore.read_artifact``).

    Returns:
        The study's view.
    """
    info = read_searches(record.optuna_storage, record.name, record.parent.run_id if record.parent else None)
    searched = searched_by_method(info, record.trials)
    rows = method_rows(record.trials, record.group_by, {m: [p.key for p in ps] for m, ps in searched.items()})
    costs = cost_rows(record.trials, rows)
    return StudyView(record=record, rows=rows, costs=costs, figures=_figures(record, rows, costs, searched, info),
                     overlays=_overlays(record.trials, read_artifact), searched=searched,
                     search_note="" if info.searches else info.note, notes=_notes(record),
                     range_warnings=range_warnings(record))


def range_warnings(record: StudyRecord) -> list[str]:
    """The study's best searched values at an edge of their range, from its ``results.json`` (if any).

    Returns:
        One line per warning (``<phase>: <message>`` when several searches warned).
    """
    found = (record.results or {}).get("range_warnings") or []
    warnings = [w for w in found if isinstance(w, dict) and isinstance(w.get("message"), str)]
    phases = {str(w.get("phase", "")) for w in warnings}
    return [(f"{w.get('phase')}: " if len(phases) > 1 else "") + w["message"] for w in warnings]


def _figures(record: StudyRecord, rows: Sequence[MethodRow], costs: Sequence[CostRow],
             searched: Mapping[str, Sequence[SearchedParam]], info: SearchInfo) -> list[FigureView]:
    budgets = {r.params.get(LABEL_KEY) for row in rows for r in row.runs}
    shown = [
        FigureView("Learning curves", figures.learning_curves(record.trials),
                   "no trial has reported a validation Dice yet"),
        FigureView("Label efficiency", figures.label_efficiency(rows, LABEL_KEY),
                   f"the final runs have {len(budgets)} value(s) of {LABEL_KEY}; the curve needs several"),
        FigureView("Sensitivity", figures.sensitivity(record.trials, searched),
                   "no searched hyperparameters with numeric values (the study ran no search)"),
    ]
    multi = [s for s in info.searches if len(s.params) >= MIN_IMPORTANCE_PARAMS]
    if multi:
        importance_note = "; ".join(f"{s.phase}: {s.note}" for s in multi if s.note) or "no search recorded importances"
        shown.append(FigureView("Parameter importances (Optuna)",
                                figures.importances(multi, MIN_IMPORTANCE_PARAMS), importance_note))
    shown.append(FigureView("Cost against result", figures.cost_vs_result(costs),
                            "no method has both a cost and a test Dice (no completed final runs)"))
    return shown


def best_trial_per_method(trials: Sequence[TrialRun]) -> dict[str, TrialRun]:
    """The trial of each method with the highest validation Dice (any phase)."""
    best: dict[str, TrialRun] = {}
    for trial in trials:
        dice = trial.best_val_dice
        if not math.isfinite(dice):
            continue
        current = best.get(trial.method)
        if current is None or dice > current.best_val_dice:
            best[trial.method] = trial
    return best


def _overlays(trials: Sequence[TrialRun], read_artifact: ArtifactReader) -> list[OverlayView]:
    best = best_trial_per_method(trials)
    order = list(dict.fromkeys(t.method for t in trials))
    return [OverlayView(method, best[method], read_artifact(best[method].run_id, OVERLAY_ARTIFACT))
            for method in order if method in best]


def _notes(record: StudyRecord) -> list[str]:
    notes = []
    if record.parent is None:
        notes.append("the study has trial runs but no parent (study) run")
    elif record.parent.run_status == "RUNNING":
        notes.append("the study is still running (its parent run is RUNNING); the report shows the trials so far")
    if record.other_invocations:
        notes.append(f"{record.other_invocations} other invocation(s) of this study are in the store; "
                     "the report shows the newest one with trials")
    if not record.trials:
        notes.append("this invocation has no trial runs yet")
    return notes
