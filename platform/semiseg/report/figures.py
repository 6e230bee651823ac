"""The report's figures, drawn with Matplotlib's Agg canvas and returned as PNG bytes.

Every function returns None when it has nothing to draw; the caller shows an empty-state
note instead. No pyplot global state is used, so figures can be drawn from any thread.
"""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

from semiseg.report.search import OptunaSearch, SearchedParam
from semiseg.report.stats import CostRow, MethodRow, sample_std
from semiseg.report.store import TrialRun
from semiseg.tracking import METRIC_VAL_DICE

DPI = 100
LOG_DECADES = 1.0
STOPPED_STATUSES = ("stopped_early",)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """A colour per method, assigned by sorted name so that every figure agrees."""
    return {method: PALETTE[index % len(PALETTE)] for index, method in enumerate(sorted(set(methods)))}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def _spread(std: float) -> float:
    """An error bar's half-length: the sample std, 0 where it is undefined (a single run)."""
    return std if math.isfinite(std) else 0.0


def use_log_axis(values: Sequence[float]) -> bool:
    """Whether an axis over ``values`` is logarithmic: all positive and spanning > 1 decade."""
    return bool(values) and min(values) > 0 and math.log10(max(values) / min(values)) > LOG_DECADES


def learning_curves(trials: Sequence[TrialRun]) -> bytes | None:
    """Validation Dice by epoch, one line per trial, coloured by method.

    Trials stopped early by ASHA are drawn dashed and faded; the legend counts full and
    stopped trials per method.

    Returns:
        PNG bytes, or None when no trial has a ``val/dice`` history.
    """
    drawn = [t for t in trials if t.histories.get(METRIC_VAL_DICE)]
    if not drawn:
        return None
    colours = method_colours([t.method for t in drawn])
    figure = _figure(8.0, 4.5)
    axes = figure.add_subplot()
    for trial in drawn:
        steps, values = zip(*trial.histories[METRIC_VAL_DICE])
        stopped = trial.status in STOPPED_STATUSES
        axes.plot(steps, values, color=colours[trial.method], linestyle="--" if stopped else "-",
                  alpha=0.35 if stopped else 0.9, linewidth=1.0 if stopped else 1.6,
                  marker="." if len(steps) < 4 else None)
    from matplotlib.lines import Line2D

    handles = []
    for method, colour in colours.items():
        mine = [t for t in drawn if t.method == method]
        stopped = sum(t.status in STOPPED_STATUSES for t in mine)
        label = f"{method} ({len(mine) - stopped} full, {stopped} stopped by ASHA)"
        handles.append(Line2D([], [], color=colour, label=label))
    if any(t.status in STOPPED_STATUSES for t in drawn):
        handles.append(Line2D([], [], color="black", linestyle="--", alpha=0.35, label="stopped early (dashed)"))
    axes.legend(handles=handles, fontsize=8, loc="best")
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation Dice")
    axes.set_title("Learning curves")
    axes.grid(alpha=0.3)
    return _png(figure)


def label_efficiency(rows: Sequence[MethodRow], key: str = "data.num_labelled") -> bytes | None:
    """Test Dice against the number of labelled cases, per method, with std error bars.

    Returns:
        PNG bytes, or None when the final runs have fewer than two values of ``key``.
    """
    points: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        for run in row.runs:
            budget, dice = run.param_float(key), run.metrics.get("test/dice")
            if budget is not None and dice is not None and math.isfinite(dice):
                points.setdefault(row.method, {}).setdefault(budget, []).append(dice)
    budgets = {b for per_method in points.values() for b in per_method}
    if len(budgets) < 2:
        return None
    colours = method_colours(list(points))
    figure = _figure(7.0, 4.5)
    axes = figure.add_subplot()
    for method, per_budget in sorted(points.items()):
        xs = sorted(per_budget)
        means = [sum(per_budget[x]) / len(per_budget[x]) for x in xs]
        stds = [_spread(sample_std(per_budget[x])) for x in xs]
        axes.errorbar(xs, means, yerr=stds, color=colours[method], marker="o", capsize=4, label=method)
    axes.set_xlabel(f"labelled cases ({key})")
    axes.set_ylabel("test Dice, mean (std) over final runs")
    axes.set_title("Label efficiency")
    axes.set_xticks(sorted(budgets))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def sensitivity(trials: Sequence[TrialRun], searched: Mapping[str, Sequence[SearchedParam]]) -> bytes | None:
    """Best validation Dice of each searched trial against each searched hyperparameter.

    One panel per parameter, with the search trials of the methods that searched it; the
    axis is logarithmic when the values are positive and span more than one decade.
    Trials stopped early are drawn as hollow markers.

    Args:
        trials: every trial of the study.
        searched: ``method -> parameters its search searched``.

    Returns:
        PNG bytes, or None when no searched trial has a value for any parameter.
    """
    search = [t for t in trials if t.is_search and math.isfinite(t.best_val_dice)]
    panels = []
    for param in dict.fromkeys(p for params in searched.values() for p in params):
        points = [(param.value(t), t) for t in search if param in searched.get(t.method, ())]
        points = [(x, t) for x, t in points if x is not None and math.isfinite(x)]
        if points:
            panels.append((param, points))
    if not panels:
        return None
    colours = method_colours([t.method for t in search])
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = _figure(4.2 * columns, 3.4 * rows)
    for index, (param, points) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for method in sorted({t.method for _, t in points}):
            for stopped in (False, True):
                mine = [(x, t.best_val_dice) for x, t in points
                        if t.method == method and (t.status in STOPPED_STATUSES) == stopped]
                if mine:
                    xs, ys = zip(*mine)
                    axes.scatter(xs, ys, s=36, edgecolors=colours[method],
                                 facecolors="none" if stopped else colours[method],
                                 label=f"{method}{' (stopped early)' if stopped else ''}")
        if use_log_axis([x for x, _ in points]):
            axes.set_xscale("log")
        axes.set_xlabel(param.label)
        axes.set_ylabel("best validation Dice")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle("Sensitivity to the searched hyperparameters")
    return _png(figure)


def importances(searches: Sequence[OptunaSearch], min_params: int = 2) -> bytes | None:
    """Optuna parameter importances, one horizontal bar chart per search of ``min_params`` or more parameters.

    A search of one parameter is left out: its importance is 1 by construction.

    Returns:
        PNG bytes, or None when no such search has importances.
    """
    shown = [s for s in searches if s.importances and len(s.importances) >= min_params]
    if not shown:
        return None
    figure = _figure(7.0, 1.2 + sum(0.45 * len(s.importances or {}) + 0.8 for s in shown))
    axes_list = figure.subplots(len(shown), 1, squeeze=False)[:, 0]
    for axes, search in zip(axes_list, shown):
        ranked: Mapping[str, float] = dict(sorted((search.importances or {}).items(), key=lambda kv: kv[1]))
        axes.barh(list(ranked), list(ranked.values()), color=PALETTE[0])
        axes.set_xlim(0, max(1.0, max(ranked.values())))
        axes.set_xlabel("importance (optuna.importance.get_param_importances)")
        axes.set_title(f"{search.phase} ({search.complete} complete trials)", fontsize=9)
        axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def cost_vs_result(rows: Sequence[CostRow]) -> bytes | None:
    """Mean test Dice (std error bars) against the CPU-hours each method cost.

    Returns:
        PNG bytes, or None when no method has both a cost and a test Dice.
    """
    shown = [r for r in rows if r.method != "total" and r.dice.n > 0 and math.isfinite(r.cpu_hours)]
    if not shown:
        return None
    colours = method_colours([r.method for r in shown])
    figure = _figure(7.0, 4.5)
    axes = figure.add_subplot()
    for row in shown:
        axes.errorbar([row.cpu_hours], [row.dice.mean], yerr=[_spread(row.dice.std)], color=colours[row.method],
                      marker="o", capsize=4, markersize=8, linestyle="none",
                      label=f"{row.method} ({row.trials} trials)")
    axes.set_xlabel("CPU-hours (searches and final runs)")
    axes.set_ylabel("test Dice, mean (std) over final runs")
    axes.set_title("Cost against result")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)
