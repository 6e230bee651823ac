"""Open the MLflow UI on a study's store, bound to loopback only.

    .venv/bin/python dashboards/mlflow_ui.py                          # the store of ./runs
    .venv/bin/python dashboards/mlflow_ui.py --storage-path /shared/runs --port 5001
    .venv/bin/python dashboards/mlflow_ui.py --tracking-uri sqlite:////abs/runs/mlflow.db

The UI listens on 127.0.0.1 only; from another machine use an SSH tunnel
(``ssh -L 5000:127.0.0.1:5000 host``). Exit status 2, with one line on stderr, when the
store does not exist.

``mlflow ui`` starts a server of a dozen processes (uvicorn workers, a job runner). They run
in a process group of their own; SIGTERM or SIGINT (Ctrl-C) to this script goes to the whole
group, which gets a few seconds to stop before it is killed, and the script then exits with
128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C), leaving nothing on the port.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_INPUT_ERROR = 2
HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STOP_GRACE_S = 5.0
"""How long the UI's processes get to stop after SIGTERM/SIGINT before the group is killed."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """SIGTERM or SIGINT reached the script while the UI was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
        The UI's exit status, 0 for ``--dry-run``, 2 when the store does not exist, 128 + the
        signal's number when SIGTERM or SIGINT stopped it.
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
    return run_in_own_group(command)


def run_in_own_group(command: list[str], grace_s: float = STOP_GRACE_S) -> int:
    """Run ``command`` in a new process group until it exits or this process gets SIGTERM/SIGINT.

    On either signal the whole group gets the same signal, then SIGKILL if any of it is still
    alive after ``grace_s``.

    Returns:
        The command's exit status, or 128 + the signal's number when a signal stopped it.
    """
    def request_stop(signum: int, _frame: object) -> None:
        raise StopRequested(signum)

    previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
    child = None
    try:
        child = subprocess.Popen(command, start_new_session=True)
        return child.wait()
    except StopRequested as stop:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if child is not None:
            stop_group(child, stop.signum, grace_s)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_group(leader: subprocess.Popen, signum: int, grace_s: float) -> None:
    """Send ``signum`` to ``leader``'s process group, wait up to ``grace_s``, then SIGKILL what is left.

    Returns once the leader is reaped and the group has no process left (or 5 s after SIGKILL).
    """
    group = leader.pid
    signal_group(group, signum)
    deadline = time.monotonic() + grace_s
    try:
        leader.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    wait_until_gone(group, deadline)
    if group_alive(group):
        signal_group(group, signal.SIGKILL)
        leader.wait()
        wait_until_gone(group, time.monotonic() + 5.0)


def signal_group(group: int, signum: int) -> None:
    """Send ``signum`` to process group ``group``; nothing when the group is already gone."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


def group_alive(group: int) -> bool:
    """Whether process group ``group`` still has a process (zombies included)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until_gone(group: int, deadline: float) -> None:
    """Poll until process group ``group`` is empty or ``deadline`` (``time.monotonic()``) passes."""
    while group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
