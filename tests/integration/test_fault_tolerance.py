"""Failures of a real cluster: a diverged trial, an unreachable MLflow, a killed worker, a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE
from tests.integration.conftest import REPO, study_runs

pytestmark = pytest.mark.integration
TINY = {**SMOKE, "data.phantom_shape": "32x32x4", "data.phantom_cases": 12, "data.num_validation": 2,
        "data.num_test": 2, "model.width": 4}
TINY_ARGS = ["--smoke", "--set", "data.phantom_shape=32x32x4", "--set", "data.phantom_cases=12",
             "--set", "data.num_validation=2", "--set", "data.num_test=2", "--set", "model.width=4"]


def _steps(client, run_id: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, "val/dice"), key=lambda m: m.timestamp)]


def test_diverged_trial_is_recorded_and_the_study_finishes(ray_local, mlflow_store, tmp_path):
    study = Study(name="divergence_check", description="one trial diverges", base={**TINY, "method.name": "supervised"},
                  baselines=({"method.name": "supervised", "optim.lr": 1e30, "optim.grad_clip": 0.0},
                             {"method.name": "supervised"}))
    outcome = run_study(study, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store])
    statuses = sorted(r.status for r in outcome.rows)
    assert statuses == ["completed", "diverged"]
    client, _, children = study_runs(mlflow_store, "divergence_check")
    assert sorted(c.data.tags["semiseg.status"] for c in children) == ["completed", "diverged"]
    diverged = next(c for c in children if c.data.tags["semiseg.status"] == "diverged")
    assert diverged.data.metrics["diverged"] == 1.0
    results = json.loads((tmp_path / "divergence_check" / "results.json").read_text())
    assert sorted(t["status"] for t in results["trials"]) == ["completed", "diverged"]
    assert outcome.final["supervised"]["dice"][2] == 1, "a diverged trial is not averaged in as a zero"


def test_unreachable_mlflow_warns_and_the_study_finishes(ray_local, tmp_path):
    from tests.integration.conftest import load_study

    study = load_study("ema_sweep").STUDY
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = run_study(study, ["--storage-path", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9",
                                    *TINY_ARGS])
    assert any("unreachable" in str(w.message) for w in caught)
    assert len(outcome.rows) == 4 and all(r.status == "completed" for r in outcome.rows)
    results = json.loads((tmp_path / "ema_sweep" / "results.json").read_text())
    assert len(results["trials"]) == 4 and results["parent_run_id"] is None


def _reporting_trial_pid(trial_folder: Path) -> int | None:
    """The pid of the process that wrote the trial's last result (Tune records it in result.json)."""
    results = trial_folder / "result.json"
    if not results.exists():
        return None
    lines = [line for line in results.read_text().splitlines() if line.strip()]
    return int(json.loads(lines[-1])["pid"]) if lines else None


def test_killed_trial_worker_is_retried_from_its_last_checkpoint(ray_local, mlflow_store, tmp_path):
    study = Study(name="worker_kill", description="a trial process dies mid-trial",
                  base={**TINY, "method.name": "mean_teacher", "train.max_epochs": 5, "train.steps_per_epoch": 6},
                  baselines=({"method.name": "mean_teacher"},))
    outcome_box: dict = {}
    thread = threading.Thread(target=lambda: outcome_box.setdefault("outcome", run_study(
        study, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store, "--max-concurrent", "1"])))
    thread.start()
    killed = False
    while thread.is_alive() and not killed:
        checkpoints = list((tmp_path / "ray").glob("worker_kill-final/trial_*/checkpoint_00000[1-9]"))
        pid = _reporting_trial_pid(checkpoints[0].parent) if checkpoints else None
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    thread.join()
    assert killed, "the trial finished before it could be killed"
    (row,) = outcome_box["outcome"].rows
    assert row.status == "completed" and row.epochs == 5
    client, _, children = study_runs(mlflow_store, "worker_kill")
    (child,) = children
    steps = _steps(client, child.info.run_id)
    assert steps == [1, 2, 3, 4, 5], f"each epoch is logged once: {steps}"
    (trial_folder,) = (tmp_path / "ray").glob("worker_kill-final/trial_*")
    reported = _reported_epochs(trial_folder)
    assert reported.count(1) == 1 and reported[-1] == 5, f"the retry restarted the trial: {reported}"
    assert all(later >= earlier for earlier, later in zip(reported, reported[1:])), \
        f"the retry went back more than the one epoch whose checkpoint was not yet registered: {reported}"


def _reported_epochs(trial_folder: Path) -> list[int]:
    lines = (trial_folder / "result.json").read_text().splitlines()
    return [int(json.loads(line)["epoch"]) for line in lines if line.strip()]


def _last_epoch(trial_folder: Path) -> int:
    results = trial_folder / "result.json"
    lines = [line for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    return int(json.loads(lines[-1]).get("epoch", 0)) if lines else 0


def test_killed_driver_resumes_without_rerunning_or_duplicating(tmp_path):
    storage = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, str(REPO / "studies" / "ema_sweep.py"), "--storage-path", str(storage),
               "--tracking-uri", uri, "--num-samples", "3", "--max-concurrent", "1", *TINY_ARGS,
               "--set", "train.max_epochs=4"]
    env = {**os.environ, "SEMISEG_CACHE": str(tmp_path / "cache"), "RAY_DEDUP_LOGS": "0"}
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    finished_before_kill: set[str] = set()
    try:
        while first.poll() is None:
            finished_before_kill = {folder.name.removeprefix("trial_")
                                    for folder in (storage / "ray").glob("ema_sweep-search-*/trial_*")
                                    if _last_epoch(folder) == 4}
            if finished_before_kill:
                break
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert finished_before_kill, "no trial finished before the driver was killed"

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, parents, children = study_runs(uri, "ema_sweep")
    assert len(parents) == 1, "the resumed study continues its parent run"
    trial_ids = [c.data.tags["semiseg.trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids)), "no duplicate child runs"
    orphans = [c for c in children if c.data.tags.get("semiseg.status") == "orphaned"]
    assert all(c.info.status == "KILLED" for c in orphans), "a run of a trial Tune lost with the driver is closed"
    children = [c for c in children if c not in orphans]
    searched = [c for c in children if c.data.tags["semiseg.phase"].startswith("search")]
    assert len(searched) == 3
    assert all(c.info.status == "FINISHED" for c in children), [(c.info.run_name, c.info.status) for c in children]
    for child in children:
        steps = _steps(client, child.info.run_id)
        assert steps == sorted(set(steps)), f"{child.info.run_name} re-ran epochs: {steps}"
    results = json.loads((storage / "ema_sweep" / "results.json").read_text())
    assert {t["trial_id"] for t in results["trials"] if t["phase"].startswith("search")} >= finished_before_kill
