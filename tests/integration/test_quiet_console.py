"""A study's console on a real local Ray: its own progress, Ray's output in its log file, Ray's death in one line."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration
TINY = ["--smoke", "--set", "data.phantom_shape=32x32x4", "--set", "data.phantom_cases=12",
        "--set", "data.num_validation=2", "--set", "data.num_test=2", "--set", "model.width=4"]


def _study(tmp_path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "studies" / "ema_sweep.py"), "--storage-path", str(tmp_path),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *TINY, *extra]


def test_default_console_shows_progress_and_no_ray_internals(tmp_path):
    run = subprocess.run(_study(tmp_path), capture_output=True, text=True, timeout=600)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console
    for internal in ("Checkpoint successfully created", "Trial status", "== Status ==", "_storage_path",
                     "snapshotting", "Token authentication", "Successfully registered model", "Traceback"):
        assert internal not in console, f"{internal!r} on the console:\n{console}"
    lines = console.splitlines()
    assert len(lines) < 80, console
    assert any(line.startswith("search-mean_teacher: 2 done, 0 running, 0 pending") for line in lines), console
    assert any(line.startswith("final: 2 done") and "best val/dice" in line for line in lines), console
    assert "== trials" in console and "results:" in console
    log_file = tmp_path / "ema_sweep" / "ray.log"
    assert f"Ray's and Tune's logs: {log_file}" in console
    logged = log_file.read_text()
    assert "Checkpoint successfully created" in logged and "Wrote the latest version of all result files" in logged


def test_verbose_brings_tunes_output_back(tmp_path):
    run = subprocess.run(_study(tmp_path, "--verbose", "--num-samples", "1", "--skip-baselines", "--final-seeds", "0"),
                         capture_output=True, text=True, timeout=600)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console
    assert "== Status ==" in console and "Checkpoint successfully created" in console


def test_a_dead_raylet_ends_the_study_with_one_line_and_the_resume_command(tmp_path):
    """Kill the raylet of the Ray the study started (a child of the study's process, so never another
    one): the study says so in one line with ``--resume``, exits 3, and leaves none of its processes."""
    study = subprocess.Popen(_study(tmp_path, "--set", "train.max_epochs=50"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in study.stdout:
            lines.append(line)
            if line.startswith("search-mean_teacher: "):
                break
        children = psutil.Process(study.pid).children(recursive=True)
        (raylet,) = [p for p in children if p.name() == "raylet"]
        raylet.kill()
        lines += study.stdout.readlines()
        status = study.wait(timeout=120)
    finally:
        if study.poll() is None:
            study.kill()
    console = "".join(lines)
    assert status == 3, console
    errors = [line for line in lines if "Ray stopped" in line]
    assert len(errors) == 1 and errors[0].startswith("error: Ray stopped during search-mean_teacher"), console
    assert errors[0].rstrip().endswith("--set train.max_epochs=50 --resume")
    assert "Traceback" not in console and "Raylet is terminated" not in console
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
