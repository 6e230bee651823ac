"""Render the comparison report of one or more studies from an MLflow store as one HTML file.

    .venv/bin/python dashboards/study_report.py                       # the studies of ./runs
    .venv/bin/python dashboards/study_report.py --storage-path /shared/runs --study ema_sweep
    .venv/bin/python dashboards/study_report.py --tracking-uri http://127.0.0.1:5000 --study ema_sweep --out ema.html

The page is self-contained (inline CSS, images embedded, no scripts, no external links). It is
written into the study's folder, ``<storage-path>/<study>/report.html`` (beside its
``results.json``), or ``<storage-path>/report.html`` when it shows several studies, unless
``--out`` says otherwise; the script prints its path. Exit status 2, with one line on stderr,
when the store or a named study does not exist.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

EXIT_INPUT_ERROR = 2
DEFAULT_STORAGE_PATH = "runs"
"""The studies' default ``--storage-path``."""
REPORT_NAME = "report.html"


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--tracking-uri``, ``--storage-path``, ``--study`` (repeatable), ``--out``."""
    parser = argparse.ArgumentParser(description="Render the HTML comparison report of studies in an MLflow store.")
    parser.add_argument("--storage-path", default=None,
                        help="the studies' local folder (their --storage-path, or --state-dir when they set it); "
                             "its mlflow.db is the default store and the report goes into it (default: the folder "
                             f"of a local --tracking-uri's store, else ./{DEFAULT_STORAGE_PATH})")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store, e.g. sqlite:////abs/runs/mlflow.db or http://127.0.0.1:5000 "
                             "(default: sqlite:///<storage-path>/mlflow.db)")
    parser.add_argument("--study", action="append", default=[],
                        help="study (experiment) name; repeatable (default: every study in the store)")
    parser.add_argument("--out", default=None,
                        help=f"the HTML file to write (default: <storage-path>/<study>/{REPORT_NAME} for one "
                             f"study, <storage-path>/{REPORT_NAME} for several)")
    return parser


def studies_folder(tracking_uri: str | None, storage_path: str | None) -> Path:
    """The studies' local folder: ``storage_path`` if given, else the folder of a local store, else ``./runs``."""
    if storage_path:
        return Path(storage_path).expanduser()
    if tracking_uri:
        from semiseg.report.store import local_store_path

        local = local_store_path(tracking_uri)
        if local is not None:
            return local.parent
    return Path(DEFAULT_STORAGE_PATH)


def store_uri(tracking_uri: str | None, folder: Path) -> str:
    """The store to read: ``tracking_uri`` if given, else the SQLite store in ``folder``."""
    from semiseg.tracking import default_tracking_uri

    return tracking_uri or default_tracking_uri(folder.expanduser())


def default_report_path(folder: Path, studies: Sequence[str]) -> Path:
    """``<folder>/<study>/report.html`` for one study, ``<folder>/report.html`` for several (or none)."""
    if len(studies) == 1:
        return folder / studies[0] / REPORT_NAME
    return folder / REPORT_NAME


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report and print its path.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).

    Returns:
        0 on success, 2 when the store or a study does not exist.
    """
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from semiseg.report import ReportStore, StoreError, write_report

    folder = studies_folder(args.tracking_uri, args.storage_path)
    uri = store_uri(args.tracking_uri, folder)
    try:
        studies = list(args.study) or (ReportStore(uri).study_names() if args.out is None else [])
        out = Path(args.out) if args.out is not None else default_report_path(folder, studies)
        path = write_report(uri, studies, out)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
