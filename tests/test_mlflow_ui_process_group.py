"""``dashboards/mlflow_ui.py`` stops the whole ``mlflow ui`` process group on SIGTERM.

It starts a real ``mlflow ui`` (a dozen processes) on an empty SQLite store, waits until the
port answers HTTP, sends SIGTERM to the dashboard script and checks that every process of the
UI's group is gone and the port is free. No Ray; marked integration for the UI's start-up time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, ppid, pgrp, …; None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def _processes() -> dict[int, list[str]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                table[int(entry)] = fields
    return table


def _children(pid: int) -> list[int]:
    return [child for child, fields in _processes().items() if int(fields[1]) == pid]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree."""
    table = _processes()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, fields in table.items() if int(fields[1]) == parent]
        found += children
        frontier += children
    return sorted(found)


def _group(pgid: int) -> list[int]:
    return [pid for pid, fields in _processes().items() if int(fields[2]) == pgid]


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _answers_http(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc (Linux)")
def test_sigterm_stops_every_process_of_the_ui_and_frees_the_port(tmp_path: Path):
    store = tmp_path / "mlflow.db"
    store.touch()
    port = _free_port()
    log = tmp_path / "mlflow_ui.log"
    with log.open("w") as output:
        dashboard = subprocess.Popen([sys.executable, str(REPO / "dashboards" / "mlflow_ui.py"), "--tracking-uri",
                                      f"sqlite:///{store}", "--port", str(port)], stdout=output, stderr=output)
    group, members = None, []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers_http(port) and dashboard.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert dashboard.poll() is None, f"the dashboard exited with {dashboard.returncode}: {log.read_text()[-3000:]}"
        assert _answers_http(port), f"the MLflow UI never answered /health: {log.read_text()[-3000:]}"
        (ui,) = _children(dashboard.pid)
        group = ui
        members = _descendants(dashboard.pid)
        assert ui in members and len(members) >= 2, members  # mlflow ui and its server's processes
        groups = {int(_stat_fields(pid)[2]) for pid in members if _alive(pid)}
        dashboard_group = os.getpgid(dashboard.pid)

        dashboard.send_signal(signal.SIGTERM)
        status = dashboard.wait(timeout=STOP_TIMEOUT_S + 10)

        def survivors() -> list[int]:
            return sorted(pid for pid in {*members, *_group(group)} if _alive(pid))

        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (survivors() or _port_in_use(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert survivors() == [], "processes of the UI outlived the dashboard"
        assert not _port_in_use(port), f"port {port} still answers"
        assert status == 128 + signal.SIGTERM
        assert groups == {ui} != {dashboard_group}, "the UI runs in a process group of its own"
    finally:
        _kill_leftovers(dashboard, group, members)


def _kill_leftovers(dashboard: subprocess.Popen, group: int | None, members: list[int]) -> None:
    """SIGKILL what the test started and is still alive (a failed test must not leave a UI running)."""
    if dashboard.poll() is None:
        dashboard.kill()
        dashboard.wait()
    leftovers = [*members, *(_group(group) if group is not None else [])]
    for pid in leftovers:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
