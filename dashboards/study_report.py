"""Render the comparison report of one or more studies from an MLflow store as one HTML file.

    python dashboards/study_report.py --tracking-uri sqlite:///$PWD/runs/mlflow.db
    python dashboards/study_report.py --tracking-uri http://127.0.0.1:5000 --study ema_sweep --out ema.html

The page is self-contained (inline CSS, images embedded, no scripts, no external links).
Exit status 2, with one line on stderr, when the store or a named study does not exist.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

EXIT_INPUT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--tracking-uri`` (required), ``--study`` (repeatable), ``--out``."""
    parser = argparse.ArgumentParser(description="Render the HTML comparison report of studies in an MLflow store.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tracking-uri", required=True,
                        help="MLflow store, e.g. sqlite:////abs/runs/mlflow.db or http://127.0.0.1:5000")
    parser.add_argument("--study", action="append", default=[],
                        help="study (experiment) name; repeatable; default: every study in the store")
    parser.add_argument("--out", default="report.html", help="the HTML file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report and print its path.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).

    Returns:
        0 on success, 2 when the store or a study does not exist.
    """
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from semiseg.report import StoreError, write_report

    try:
        path = write_report(args.tracking_uri, args.study, Path(args.out))
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
