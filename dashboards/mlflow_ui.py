"""Open the MLflow UI on a study's store, bound to loopback only.

    python dashboards/mlflow_ui.py                          # the store of ./runs
    python dashboards/mlflow_ui.py --storage-path /shared/runs --port 5001
    python dashboards/mlflow_ui.py --tracking-uri sqlite:////abs/runs/mlflow.db

The UI listens on 127.0.0.1 only; from another machine use an SSH tunnel
(``ssh -L 5000:127.0.0.1:5000 host``). Exit status 2, with one line on stderr, when the
store does not exist.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Sequence

EXIT_INPUT_ERROR = 2
HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--tracking-uri`` or ``--storage-path``, ``--port``, ``--dry-run``."""
    parser = argparse.ArgumentParser(description="Start `mlflow ui` on a study's store (127.0.0.1 only).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tracking-uri", default=None, help="MLflow store URI, e.g. sqlite:////abs/runs/mlflow.db")
    source.add_argument("--storage-path", default="runs",
                        help="the studies' --storage-path; its store is sqlite:///<abs path>/mlflow.db")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return parser


def store_uri(tracking_uri: str | None, storage_path: str) -> str:
    """The store to open: ``tracking_uri`` if given, else the SQLite store under ``storage_path``."""
    if tracking_uri:
        return tracking_uri
    return f"sqlite:///{(Path(storage_path).expanduser() / 'mlflow.db').resolve()}"


def ui_command(uri: str, port: int) -> list[str]:
    """``mlflow ui`` of this interpreter's MLflow on ``uri``, listening on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port)]


def main(argv: Sequence[str] | None = None) -> int:
    """Start the UI (blocking until it stops) or print its command with ``--dry-run``.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).

    Returns:
        The UI's exit status, 0 for ``--dry-run``, 2 when the store does not exist.
    """
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port must be in 1..65535, not {args.port}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    from semiseg.report.store import StoreError, check_store

    uri = store_uri(args.tracking_uri, args.storage_path)
    try:
        check_store(uri)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    from semiseg.tracking import redact_uri

    command = ui_command(uri, args.port)
    if args.dry_run:
        print(" ".join(redact_uri(part) for part in command))
        return 0
    print(f"MLflow UI of {redact_uri(uri)}: http://{HOST}:{args.port} (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
