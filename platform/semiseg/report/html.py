"""Render study views as one self-contained HTML page.

The page has inline CSS, images as base64 ``data:`` URIs, no scripts and no external
references, so it can be mailed, archived as a CI artifact or opened offline. Every piece
of text that comes from the store (run names, params, tags, notes) is escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
import re
from html import escape
from typing import Iterable, Sequence

from semiseg.report.build import FigureView, OverlayView, StudyView
from semiseg.report.stats import (PER_CLASS_METRICS, TEST_METRICS, WILCOXON_MIN_PAIRS, CostRow, MethodRow, Summary,
                                  verdict)

METRIC_TITLES = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "HD95 (mm)", "asd": "ASD (mm)",
                 "nsd": "NSD (1 mm)", "precision": "Precision", "recall": "Recall"}
DISTANCE_METRICS = ("hd95", "asd")
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1300px;padding:0 1rem;color:#1d2330;background:#fff;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{border-bottom:2px solid #d6dbe4;padding-bottom:.3rem;margin-top:2.5rem}
h3{margin-top:1.8rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d6dbe4;padding:.35rem .6rem;text-align:left;vertical-align:top}
th{background:#f1f4f9}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.reference td{background:#fafbfd}
.meta{color:#5a6475;font-size:.9rem}.empty{color:#7a4b00;background:#fff8e6;border:1px solid #f0d9a8;
padding:.5rem .8rem;border-radius:4px}
.note{color:#5a6475;font-size:.85rem}
.figures{display:flex;flex-wrap:wrap;gap:1.2rem}
figure{margin:0;border:1px solid #e3e7ee;border-radius:4px;padding:.5rem;background:#fff}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:.85rem;color:#5a6475;margin-top:.3rem;max-width:640px}
.overlays{display:flex;flex-wrap:wrap;gap:1rem}.overlays figure{max-width:420px}
.overlays img{height:360px;width:auto;max-width:100%;object-fit:contain;image-rendering:pixelated}
code{background:#f1f4f9;padding:0 .25rem;border-radius:3px}
nav ul{columns:3}
details summary{cursor:pointer;font-weight:600}
"""


def render_page(views: Sequence[StudyView], tracking_uri: str) -> str:
    """The whole report page.

    Args:
        views: one view per study (an empty sequence renders the empty state).
        tracking_uri: shown in the header (as text, never as a link).

    Returns:
        The HTML document.
    """
    anchors = _anchors([v.record.name for v in views])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(_title(views))}</title><style>{CSS}</style></head><body>",
             f"<h1>{escape(_title(views))}</h1>",
             f'<p class="meta">MLflow store <code>{escape(tracking_uri)}</code> &middot; generated {escape(stamp)}</p>']
    if not views:
        parts.append('<p class="empty">No studies in this store: run a study first '
                     '(e.g. <code>python studies/ema_sweep.py --smoke</code>).</p>')
    elif len(views) > 1:
        parts.append("<nav><ul>" + "".join(f'<li><a href="#{a}">{escape(v.record.name)}</a></li>'
                                           for v, a in zip(views, anchors)) + "</ul></nav>")
    parts += [_study(view, anchor) for view, anchor in zip(views, anchors)]
    parts.append("</body></html>")
    return "\n".join(parts)


def _title(views: Sequence[StudyView]) -> str:
    if len(views) == 1:
        return f"Study report: {views[0].record.name}"
    return "Study report"


def _anchors(names: Sequence[str]) -> list[str]:
    anchors = []
    for index, name in enumerate(names):
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "study"
        anchors.append(f"study-{index}-{slug}")
    return anchors


def _study(view: StudyView, anchor: str) -> str:
    record = view.record
    statuses: dict[str, int] = {}
    for trial in record.trials:
        statuses[trial.status] = statuses.get(trial.status, 0) + 1
    parent = record.parent
    meta = [f"{len(record.trials)} trial(s)" + (" (" + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
                                                + ")" if statuses else "")]
    if parent is not None:
        meta += [f"dataset {parent.tags.get('semiseg.dataset', '?')}",
                 f"parent run {parent.name} ({parent.run_id}, {parent.run_status})"]
    parts = [f'<section id="{escape(anchor)}">', f"<h2>{escape(record.name)}</h2>",
             f'<p class="meta">{escape(" · ".join(meta))}</p>']
    parts += [f'<p class="note">{escape(note)}</p>' for note in view.notes]
    parts += ["<h3>Methods</h3>", _method_table(view.rows, anchor), _per_class_table(view.rows)]
    if view.range_warnings:
        parts.append('<p class="empty">Edge of a searched range (the optimum may lie outside it):<br>'
                     + "<br>".join(escape(line) for line in view.range_warnings) + "</p>")
    if view.searched:
        parts.append('<p class="note">Searched: ' + "; ".join(
            f"{escape(method)}: " + ", ".join(f"<code>{escape(p.label)}</code>" for p in params)
            for method, params in view.searched.items()) + "</p>")
    elif view.search_note:
        parts.append(f'<p class="note">{escape(view.search_note)}</p>')
    parts += ["<h3>Figures</h3>", '<div class="figures">', *(_figure(f) for f in view.figures), "</div>"]
    parts += ["<h3>Prediction overlays of the best trial per method</h3>", _overlays(view.overlays)]
    parts += ["<h3>Cost</h3>", _cost_table(view.costs)]
    if record.registered_models:
        parts += ["<h3>Registered models</h3>", _table(
            ["Model", "Latest version", "Source run"],
            [[escape(m.name), escape(m.latest_version), escape(m.run_id)] for m in record.registered_models])]
    parts += [_trials_table(view), "</section>"]
    return "\n".join(parts)


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "–"


def _summary(summary: Summary, digits: int) -> str:
    if summary.n == 0:
        return "–"
    return f"{_fmt(summary.mean, digits)} ({_fmt(summary.std, digits)})"


def _verdict(row: MethodRow) -> str:
    if row.comparison is None:
        return "reference"
    return escape(verdict(row.comparison))


def _splits(rows: Sequence[MethodRow]) -> int:
    return len({r.params.get("data.split", "0") for row in rows for r in row.runs})


def _method_table(rows: Sequence[MethodRow], anchor: str) -> str:
    if not rows:
        return ('<p class="empty">No completed final-phase runs: the method table needs the final phase '
                "(final_seeds &ge; 1 or baselines), run to the end.</p>")
    over = "splits × seeds" if _splits(rows) > 1 else "seeds"
    headers = ["Method", "Runs", *(METRIC_TITLES[m] for m in TEST_METRICS), "Best configuration",
               "Against supervised (paired by split and seed)"]
    body = []
    for row in rows:
        digits = {m: 2 if m in DISTANCE_METRICS else 4 for m in TEST_METRICS}
        config = ", ".join(f"{k}={v}" for k, v in row.best_config.items()) or "defaults (not searched)"
        cells = [escape(row.label), str(max((s.n for s in row.metrics.values()), default=0))]
        cells += [_summary(row.metrics[m], digits[m]) for m in TEST_METRICS]
        cells += [escape(config), _verdict(row)]
        css = ' class="reference"' if row.comparison is None else ""
        body.append(f"<tr{css}>" + "".join(
            f'<td class="num">{c}</td>' if 1 <= i <= len(TEST_METRICS) else f"<td>{c}</td>"
            for i, c in enumerate(cells)) + "</tr>")
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return (f'<table class="methods" id="methods-{escape(anchor)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>'
            f'<p class="note">Test metrics of the completed final-phase runs: mean (sample std, ddof 1) over {over}; '
            "HD95 and ASD in mm. Pairs are runs of the same group with the same data.split and train.seed; the "
            "verdict reads the 95 % t-interval of the mean Dice difference (paired t-test): no evidence of a "
            f"difference when it contains 0. With {WILCOXON_MIN_PAIRS} or more pairs the Wilcoxon signed-rank "
            "p-value is added.</p>")


def _per_class_table(rows: Sequence[MethodRow]) -> str:
    """Per-class test Dice and HD95 per method (multi-class data only; "" otherwise)."""
    shown = [row for row in rows if row.per_class]
    if not shown:
        return ""
    labels = list(dict.fromkeys(label for row in shown for label in row.per_class))
    titles = {"dice": "Dice", "hd95": "HD95 (mm)"}
    headers = ["Method", *(f"{label} {titles[m]}" for label in labels for m in PER_CLASS_METRICS)]
    body = [[escape(row.label), *(_summary(row.per_class[label][m], 2 if m in DISTANCE_METRICS else 4)
                                  if label in row.per_class else "–"
                                  for label in labels for m in PER_CLASS_METRICS)] for row in shown]
    return ('<h4>Per class</h4>' + _table(headers, body, numeric_from=1)
            + '<p class="note">Per-class test metrics (test/&lt;metric&gt;/&lt;label&gt;): mean (sample std) '
            "over the final runs.</p>")


def data_uri(image: bytes) -> str | None:
    """A ``data:`` URI for PNG or JPEG bytes; None for anything else."""
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    elif image.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    else:
        return None
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def _img(image: bytes | None, alt: str) -> str | None:
    uri = data_uri(image) if image else None
    return f'<img src="{uri}" alt="{escape(alt)}">' if uri else None


def _figure(view: FigureView) -> str:
    image = _img(view.png, view.title)
    if image is None:
        return f'<figure><figcaption><strong>{escape(view.title)}</strong></figcaption>' \
               f'<p class="empty">{escape(view.note)}</p></figure>'
    return f"<figure>{image}<figcaption>{escape(view.title)}</figcaption></figure>"


def _overlays(overlays: Sequence[OverlayView]) -> str:
    if not overlays:
        return '<p class="empty">No trial has a validation Dice yet, so there is no best trial to show.</p>'
    items = []
    for overlay in overlays:
        trial = overlay.trial
        caption = (f"{overlay.method}: run {trial.name} (trial {trial.trial_id}, {trial.phase}), "
                   f"best validation Dice {_fmt(trial.best_val_dice)}")
        image = _img(overlay.png, f"overlay of {trial.name}") or '<p class="empty">no overlay</p>'
        items.append(f"<figure>{image}<figcaption>{escape(caption)}; image | ground truth | prediction"
                     "</figcaption></figure>")
    return '<div class="overlays">' + "".join(items) + "</div>"


def _cost_table(rows: Sequence[CostRow]) -> str:
    if not rows:
        return '<p class="empty">No trials, no cost.</p>'
    gpus = any(r.gpu_hours > 0 for r in rows)
    headers = ["Method", "Trials", "Epochs", "CPU-hours", *(["GPU-hours"] if gpus else []),
               "Test Dice mean (std)"]
    body = []
    for row in rows:
        cells = [escape(row.method), str(row.trials), str(row.epochs), f"{row.cpu_hours:.4f}",
                 *([f"{row.gpu_hours:.4f}"] if gpus else []), _summary(row.dice, 4)]
        body.append(cells)
    note = "" if gpus else '<p class="note">No GPUs were used.</p>'
    return _table(headers, body, numeric_from=1) + note + (
        '<p class="note">CPU-hours: Σ over epochs of (time/train_s + time/val_s) × CPUs per trial '
        "(train.threads × workers); GPU-hours likewise with GPUs per trial.</p>")


def _trials_table(view: StudyView) -> str:
    trials = view.record.trials
    if not trials:
        return ""
    rows = [[escape(t.name), escape(t.phase), escape(t.method), escape(t.status), str(t.epochs),
             _fmt(t.best_val_dice), _fmt(t.metrics.get("test/dice", float("nan")))] for t in trials]
    return (f"<details><summary>All {len(trials)} trials</summary>"
            + _table(["Run", "Phase", "Method", "Status", "Epochs", "Best val Dice", "Test Dice"], rows,
                     numeric_from=4) + "</details>")


def _table(headers: Iterable[str], rows: Iterable[Sequence[str]], numeric_from: int | None = None) -> str:
    """A table of already-escaped cells (headers are escaped here)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{c}</td>' if numeric_from is not None and i >= numeric_from else f"<td>{c}</td>"
        for i, c in enumerate(cells)) + "</tr>" for cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
