"""Rows and tables of a finished study, from Ray Tune's results."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from semiseg.report.stats import (MIN_CLASSES, PRIMARY_METRIC, REFERENCE_METHOD, SPLIT_KEY, Comparison, class_labels,
                                  compare, pair_key, pair_values, sample_std)
from semiseg.train.contract import expand_trial_config
from semiseg.tracking import METRIC_DIVERGED, METRIC_EPOCH, METRIC_TEST_DICE, METRIC_VAL_DICE
from semiseg.tune.failures import ERROR_KEY, describe_error

ERROR_FILE = "error.txt"
"""Tune's text record of a trial's failures, in the trial's folder (one ``Failure #`` per attempt)."""


@dataclass(frozen=True)
class TrialRow:
    """What a study reports of one trial."""

    trial_id: str
    phase: str
    method: str
    params: dict[str, Any]
    epochs: int
    best_val_dice: float
    best_epoch: int
    test_dice: float
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: str = ""
    error: str = ""
    """``Type: message`` of the error an errored trial ended with (one line)."""
    error_file: str = ""
    """Where Tune wrote the error's traceback (the trial folder's ``error.txt``)."""


def trial_status(epochs: int, max_epochs: int, diverged: bool, error: bool) -> str:
    """``error``, ``diverged``, ``completed`` or ``stopped_early`` (by ASHA)."""
    if error:
        return "error"
    if diverged:
        return "diverged"
    return "completed" if epochs >= max_epochs else "stopped_early"


def rows_from_results(results: Iterable[Any], phase: str, searched_keys: Sequence[str],
                      max_epochs: int) -> list[TrialRow]:
    """Build rows from a Ray ``ResultGrid`` (one ``Result`` per trial)."""
    rows = []
    for result in results:
        config = expand_trial_config(result.config or {})
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        best_val = float("nan")
        best_epoch = 0
        if history is not None and METRIC_VAL_DICE in history:
            values = history[METRIC_VAL_DICE].astype(float)
            if values.notna().any():
                position = int(values.idxmax())
                best_val = float(values[position])
                best_epoch = int(history[METRIC_EPOCH][position]) if METRIC_EPOCH in history else position + 1
        epochs = int(metrics.get(METRIC_EPOCH, 0) or 0)
        if not epochs and history is not None and METRIC_EPOCH in history and history[METRIC_EPOCH].notna().any():
            epochs = int(history[METRIC_EPOCH].max())  # the last report was an error's (no epoch)
        error = ""
        if result.error is not None:
            error = str(metrics.get(ERROR_KEY) or "") or describe_error(result.error)
        rows.append(TrialRow(
            trial_id=str(metrics.get("trial_id") or getattr(result, "path", "?")).rsplit("/", 1)[-1],
            phase=phase, method=str(config.get("method.name", "?")),
            params={k: config.get(k) for k in searched_keys if k in config},
            epochs=epochs, best_val_dice=best_val, best_epoch=best_epoch,
            test_dice=float(metrics.get(METRIC_TEST_DICE, float("nan"))),
            status=trial_status(epochs, max_epochs, bool(metrics.get(METRIC_DIVERGED)), result.error is not None),
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and "/" in k},
            config={k: v for k, v in config.items() if "." in k and not k.startswith("_")},
            checkpoint=checkpoint_uri(result.checkpoint), error=error,
            error_file=_error_file(result) if error else ""))
    return rows


def _error_file(result: Any) -> str:
    """The URI of a ``Result``'s ``error.txt`` (a plain path on local storage)."""
    path = f"{str(getattr(result, 'path', '') or '').rstrip('/')}/{ERROR_FILE}"
    kind = getattr(getattr(result, "filesystem", None), "type_name", "local")
    return path if kind == "local" else f"{kind}://{path}"


def first_error_line(rows: Sequence[TrialRow]) -> str:
    """``trial ID: Type: message (error file PATH)`` of the first errored row, or ``""``."""
    errored = [r for r in rows if r.status == "error"]
    if not errored:
        return ""
    row = errored[0]
    return f"trial {row.trial_id}: {row.error or 'unknown error'} (error file {row.error_file or '-'})"


def checkpoint_uri(checkpoint: Any) -> str:
    """A trial checkpoint's location as a URI that ``ray.tune.Checkpoint(path)`` can open again."""
    if checkpoint is None:
        return ""
    kind = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[TrialRow], searched_keys: Sequence[str]) -> str:
    """A fixed-width table: one line per trial, best validation Dice first."""
    headers = ["phase", "trial", "method", *searched_keys, "epochs", "best val/dice", "@epoch",
               "test/dice", "status"]
    ordered = sorted(rows, key=lambda r: (-(r.best_val_dice if not math.isnan(r.best_val_dice) else -1)))
    lines = [[r.phase, r.trial_id, r.method, *[_fmt(r.params.get(k, "")) for k in searched_keys],
              str(r.epochs), _fmt(r.best_val_dice), str(r.best_epoch), _fmt(r.test_dice), r.status]
             for r in ordered]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([render(headers), render(["-" * w for w in widths]), *map(render, lines)])


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The row with the highest best validation Dice (NaN rows ignored)."""
    valid = [r for r in rows if not math.isnan(r.best_val_dice)]
    return max(valid, key=lambda r: r.best_val_dice) if valid else None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the finite values; NaN if none (std NaN for one)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return sum(finite) / len(finite), sample_std(finite)


FINAL_METRICS = ("dice", "jaccard", "hd95", "asd", "nsd", "precision", "recall")
PER_CLASS_METRICS = ("dice", "hd95")
POSTPROCESSED_PREFIX = "test_postprocessed"
POSTPROCESSED_METRICS = ("dice", "hd95")
FinalTable = dict[str, dict[str, tuple[float, float, int]]]
"""``group label -> metric -> (mean, std, count)``."""


def group_label(row: TrialRow, group_by: Sequence[str]) -> str:
    """``method`` or ``method [key=value, ...]`` for the final table."""
    if not group_by:
        return row.method
    return f"{row.method} [" + ", ".join(f"{k}={row.config.get(k)}" for k in group_by) + "]"


def final_table(rows: Sequence[TrialRow], metrics: Sequence[str] = FINAL_METRICS, prefix: str = "test",
                group_by: Sequence[str] = ()) -> FinalTable:
    """Mean, sample std (ddof 1) and count over the runs of each ``{prefix}/{metric}``, per method
    (Table 1 of Perone).

    Args:
        rows: final-phase rows (one per split and seed).
        metrics: metric names without prefix (``dice``, or ``dice/liver`` for a class).
        prefix: ``test``, ``val`` or ``test_postprocessed``.
        group_by: config keys that split a method's rows into groups (e.g. labelled cases).

    Rows that diverged or failed count as missing values, not as zeros.
    """
    table: FinalTable = {}
    labels = sorted({group_label(r, group_by) for r in rows})
    for label in labels:
        runs = [r for r in rows if group_label(r, group_by) == label]
        table[label] = {}
        for metric in metrics:
            values = [r.metrics.get(f"{prefix}/{metric}", float("nan")) for r in runs]
            mean, std = mean_std(values)
            table[label][metric] = (mean, std, sum(1 for v in values if not math.isnan(v)))
    return table


def per_class_table(rows: Sequence[TrialRow], group_by: Sequence[str] = ()) -> FinalTable:
    """``group -> "<metric>/<label>" -> (mean, std, count)`` of the per-class test Dice and HD95.

    Empty unless the rows report per-class metrics (``test/dice/<label>``) of two or more
    foreground labels: for binary data the final table's own columns are the class's.
    """
    labels = class_labels(r.metrics for r in rows)
    if len(labels) < MIN_CLASSES:
        return {}
    return final_table(rows, [f"{m}/{label}" for label in labels for m in PER_CLASS_METRICS], group_by=group_by)


def postprocessed_table(rows: Sequence[TrialRow], group_by: Sequence[str] = ()) -> FinalTable:
    """``group -> metric -> (mean, std, count)`` of the raw and post-processed test Dice and HD95.

    The metrics are ``dice``, ``dice (pp)``, ``hd95``, ``hd95 (pp)``; empty when no row has
    post-processed metrics (``test_postprocessed/dice``).
    """
    if not any(f"{POSTPROCESSED_PREFIX}/{m}" in r.metrics for r in rows for m in POSTPROCESSED_METRICS):
        return {}
    raw = final_table(rows, POSTPROCESSED_METRICS, group_by=group_by)
    processed = final_table(rows, POSTPROCESSED_METRICS, prefix=POSTPROCESSED_PREFIX, group_by=group_by)
    return {label: {name: cells[metric] for metric in POSTPROCESSED_METRICS
                    for name, cells in ((metric, raw[label]), (f"{metric} (pp)", processed[label]))}
            for label in raw}


def per_split_table(rows: Sequence[TrialRow], metric: str = "dice", group_by: Sequence[str] = ()) -> FinalTable:
    """``group -> "split k" -> (mean, std, count)`` of ``test/{metric}`` over each split's seeds.

    Empty when the rows ran on one split. With 2 labelled cases, which two are labelled can
    move a method's mean as much as the method does; this is where that shows.
    """
    splits = sorted({int(r.config.get(SPLIT_KEY, 0) or 0) for r in rows})
    if len(splits) < 2:
        return {}
    table: FinalTable = {}
    for label in sorted({group_label(r, group_by) for r in rows}):
        table[label] = {}
        for split in splits:
            values = [r.metrics.get(f"test/{metric}", float("nan")) for r in rows
                      if group_label(r, group_by) == label and int(r.config.get(SPLIT_KEY, 0) or 0) == split]
            mean, std = mean_std(values)
            table[label][f"split {split}"] = (mean, std, sum(1 for v in values if not math.isnan(v)))
    return table


def split_count(rows: Sequence[TrialRow]) -> int:
    """How many distinct ``data.split`` values ``rows`` ran on (a row without one ran on split 0)."""
    return len({str(r.config.get(SPLIT_KEY, 0)) for r in rows})


def final_comparisons(rows: Sequence[TrialRow], table: FinalTable, group_by: Sequence[str] = ()) -> list[Comparison]:
    """Each group against the supervised group of the same labelled cases (or the only one).

    Pairs are final runs with the same (``data.split``, ``train.seed``); the worse-on check
    reads the means of ``table`` (the final table the console prints).

    Args:
        rows: completed final-phase rows.
        table: :func:`final_table` of ``rows``.
        group_by: the study's grouping keys.

    Returns:
        One comparison per non-supervised group that has a reference, in label order.
    """
    supervised = [label for label in table if label.split(" ", 1)[0] == REFERENCE_METHOD]
    comparisons = []
    for label in sorted(table):
        method, _, group = label.partition(" ")
        if method == REFERENCE_METHOD:
            continue
        same_group = f"{REFERENCE_METHOD} {group}".strip()
        reference = same_group if same_group in table else (supervised[0] if len(supervised) == 1 else None)
        if reference is None:
            continue
        ours = [r for r in rows if group_label(r, group_by) == label]
        theirs = [r for r in rows if group_label(r, group_by) == reference]
        pairs = pair_values(((pair_key(r.config), r.metrics.get(PRIMARY_METRIC)) for r in ours),
                            ((pair_key(r.config), r.metrics.get(PRIMARY_METRIC)) for r in theirs))
        means = {m: (table[label][m][0], table[reference][m][0]) for m in table[label] if m in table[reference]}
        comparisons.append(compare(label, reference, pairs, PRIMARY_METRIC, means))
    return comparisons


def format_final_table(table: FinalTable, digits: Mapping[str, int] | None = None) -> str:
    """The final table as text: ``mean (std)`` per metric, one line per method, best Dice first.

    Args:
        table: from :func:`final_table` (or :func:`per_class_table`, :func:`postprocessed_table`).
        digits: decimals per metric (default 4; a std of a single run shows as ``-``).
    """
    if not table:
        return ""
    metrics = list(next(iter(table.values())))
    return _render(["method", "n", *metrics], [
        [label, str(max(v[2] for v in table[label].values())),
         *(_mean_std(*table[label][m][:2], (digits or {}).get(m, 4)) for m in metrics)]
        for label in _by_dice(table)])


def format_per_class_table(table: FinalTable) -> str:
    """The per-class table as text: one column per label, ``Dice mean (std) / HD95 mean (std)``."""
    if not table:
        return ""
    labels = list(dict.fromkeys(key.split("/", 1)[1] for cells in table.values() for key in cells))
    lines = []
    for group in _by_dice(table, "dice/" + labels[0]):
        cells = table[group]
        lines.append([group, str(max(v[2] for v in cells.values())),
                      *(f"{_mean_std(*cells[f'dice/{label}'][:2], 4)} / {_mean_std(*cells[f'hd95/{label}'][:2], 2)}"
                        for label in labels)])
    return _render(["method", "n", *labels], lines)


def _by_dice(table: FinalTable, metric: str = "dice") -> list[str]:
    def mean(label: str) -> float:
        value = table[label].get(metric, (float("nan"),))[0]
        return -1.0 if math.isnan(value) else value
    return sorted(table, key=lambda label: -mean(label))


def _mean_std(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ({'-' if math.isnan(std) else f'{std:.{digits}f}'})"


def _render(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([render(headers), render(["-" * w for w in widths]), *map(render, lines)])
