"""Comparison reports of finished studies, read back from MLflow.

The modules each have one job:

* :mod:`semiseg.report.store` reads studies (parent run, child runs, metric histories,
  ``results.json``, registered models) into plain dataclasses;
* :mod:`semiseg.report.stats` computes mean (std) over seeds (splits × seeds with
  ``--final-splits``), the paired test against the supervised model and the compute cost;
* :mod:`semiseg.report.search` reads the Optuna storage of a study (searched parameters,
  parameter importances);
* :mod:`semiseg.report.figures` draws the figures as PNG bytes;
* :mod:`semiseg.report.build` assembles one study's tables, figures and overlays;
* :mod:`semiseg.report.html` renders them as one self-contained HTML page.

Typical use::

    from semiseg.report import write_report
    write_report("sqlite:////abs/runs/mlflow.db", ["ema_sweep"], Path("report.html"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from semiseg.report.store import ReportStore, StoreError, StudyNotFoundError, StudyRecord, TrialRun
from semiseg.tracking import redact_uri

__all__ = ["ReportStore", "StoreError", "StudyNotFoundError", "StudyRecord", "TrialRun", "render_report",
           "write_report"]


def render_report(tracking_uri: str, studies: Sequence[str] | None = None) -> str:
    """The HTML report of ``studies`` (every study of the store when None or empty).

    Args:
        tracking_uri: the MLflow store (``sqlite:////abs/mlflow.db``, ``http://host:5000``).
        studies: study (experiment) names.

    Returns:
        One self-contained HTML page.

    Raises:
        StoreError: the store does not exist or does not answer.
        StudyNotFoundError: a named study is not in the store.
    """
    from semiseg.report.build import build_study_view
    from semiseg.report.html import render_page

    store = ReportStore(tracking_uri)
    names = list(studies) if studies else store.study_names()
    records = [store.load_study(name) for name in names]
    views = [build_study_view(record, store.read_artifact) for record in records]
    return render_page(views, redact_uri(tracking_uri))


def write_report(tracking_uri: str, studies: Sequence[str] | None, out: Path) -> Path:
    """Render the report (see :func:`render_report`) and write it to ``out``.

    Returns:
        The absolute path of the written file.

    Raises:
        StoreError: the store does not exist or does not answer.
        StudyNotFoundError: a named study is not in the store.
    """
    page = render_report(tracking_uri, studies)
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
