"""Trials that cannot succeed, on a real Ray: run once, reported, and a study of only those exits 1.

The deterministic error is a real one that the driver's checks let through: ``model.depth=6``
on the 32x32 phantom slices. The driver builds the model (it is a valid network) but runs no
data through it; in the trial the fifth pooling of a 1x1 map raises torch's ``RuntimeError:
Given input size: (...x1x1). Calculated output size: (...x0x0). Output size is too small``.

Attempts are counted from Tune's own record: every failure of a trial appends a
``Failure # N`` entry to the trial's ``error.txt`` (3 per trial when every error was retried).
A lost worker keeps its retries: a killed DDP worker's trial is retried once and completes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE
from tests.integration.conftest import REPO, load_study, study_runs
from tests.integration.test_job_submit import free_ports

pytestmark = pytest.mark.integration
TINY = {**SMOKE, "data.phantom_shape": "32x32x4", "data.phantom_cases": 12, "data.num_validation": 2,
        "data.num_test": 2, "model.width": 4, "train.max_epochs": 1}
TINY_ARGS = ["--smoke", "--set", "data.phantom_shape=32x32x4", "--set", "data.phantom_cases=12",
             "--set", "data.num_validation=2", "--set", "data.num_test=2", "--set", "model.width=4"]
TOO_DEEP = {"model.depth": 6}
MESSAGE = "RuntimeError: Given input size"


def _attempts(error_file: str | Path) -> int:
    """How many times Tune recorded the trial failing (``Failure # N`` entries of ``error.txt``)."""
    text = Path(error_file).read_text()
    return sum(1 for line in text.splitlines() if line.startswith("Failure # "))


def _error_line(stderr: str) -> str:
    [line] = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return line


def test_a_deterministic_error_ends_its_trial_once_and_the_others_go_on(ray_local, mlflow_store, tmp_path):
    study = Study(name="partial_errors", description="one baseline cannot run",
                  base={**TINY, "method.name": "supervised"},
                  baselines=({"method.name": "supervised", **TOO_DEEP}, {"method.name": "supervised"}))
    outcome = run_study(study, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store])
    assert sorted(r.status for r in outcome.rows) == ["completed", "error"]
    (errored,) = [r for r in outcome.rows if r.status == "error"]
    assert errored.error.startswith(MESSAGE) and "Output size is too small" in errored.error
    assert Path(errored.error_file).is_file() and Path(errored.error_file).parent.name == f"trial_{errored.trial_id}"
    assert _attempts(errored.error_file) == 1, Path(errored.error_file).read_text()[-2000:]
    results = json.loads((tmp_path / "partial_errors" / "results.json").read_text())
    assert {t["status"]: t["error"] for t in results["trials"]}["error"] == errored.error
    client, parents, children = study_runs(mlflow_store, "partial_errors")
    assert parents[0].info.status == "FINISHED"
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["semiseg.error"] == errored.error
    assert outcome.final["supervised"]["dice"][2] == 1


def test_a_study_whose_searched_trials_all_errored_exits_1_before_the_final_phase(ray_local, mlflow_store,
                                                                                  tmp_path, capsys):
    study = load_study("ema_sweep").STUDY
    with pytest.raises(SystemExit) as exited:
        run_study(study, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store, *TINY_ARGS,
                          "--num-samples", "2", "--max-epochs", "1", "--final-seeds", "0", "--set", "model.depth=6"])
    assert exited.value.code == 1
    line = _error_line(capsys.readouterr().err)
    prefix = "error: search-mean_teacher: all 2 trial(s) errored; first: trial "
    assert line.startswith(prefix) and f": {MESSAGE}" in line, line
    error_file = Path(line.rsplit("(error file ", 1)[1].rstrip(")"))
    assert error_file.is_file() and _attempts(error_file) == 1
    assert all(_attempts(f) == 1 for f in (tmp_path / "ray").glob("ema_sweep-search-*/trial_*/error.txt"))
    assert not list((tmp_path / "ray").glob("ema_sweep-final*")), "the baselines must not run"
    rows = json.loads((tmp_path / "ema_sweep" / "results.json").read_text())["trials"]
    assert [r["status"] for r in rows] == ["error", "error"]
    _, parents, children = study_runs(mlflow_store, "ema_sweep")
    assert parents[0].info.status == "FAILED" and [c.info.status for c in children] == ["FAILED", "FAILED"]


def test_a_deterministic_error_in_a_ddp_worker_is_not_retried(ray_local, mlflow_store, tmp_path, capsys):
    study = Study(name="ddp_errors", description="a DDP trial that cannot run",
                  base={**TINY, "method.name": "supervised", **TOO_DEEP}, baselines=({"method.name": "supervised"},))
    with pytest.raises(SystemExit) as exited:
        run_study(study, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store,
                          "--workers-per-trial", "2"])
    assert exited.value.code == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: final: all 1 trial(s) errored; first: trial ") and f": {MESSAGE}" in line, line
    (error_file,) = (tmp_path / "ray").glob("ddp_errors-final/trial_*/error.txt")
    assert _attempts(error_file) == 1, error_file.read_text()[-3000:]
    assert "Training failed due to worker errors" in error_file.read_text(), "Ray Train's own error is recorded"


def test_a_killed_ddp_worker_is_retried_by_tune_from_the_train_checkpoint(ray_local, mlflow_store, tmp_path):
    """A lost DDP worker keeps its retries: Ray Train's run has ``max_failures=0``, so Tune retries
    the trial, and the new Train run of the same name resumes from its latest checkpoint."""
    study = Study(name="ddp_kill", description="a DDP worker dies mid-trial",
                  base={**TINY, "method.name": "supervised", "train.max_epochs": 3, "train.steps_per_epoch": 6},
                  baselines=({"method.name": "supervised"},))
    outcome_box: dict = {}
    thread = threading.Thread(target=lambda: outcome_box.setdefault("outcome", run_study(
        study, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store, "--workers-per-trial", "2"])))
    thread.start()
    killed = None
    while thread.is_alive() and killed is None:
        if list((tmp_path / "ray").glob("ddp-*/checkpoint_*")):
            listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
            workers = [line.split()[0] for line in listing.splitlines() if "ray::RayTrainWorker" in line]
            if workers:
                killed = int(workers[-1])
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join()
    assert killed is not None, "the trial finished before a worker could be killed"
    (row,) = outcome_box["outcome"].rows
    assert row.status == "completed" and row.epochs == 3
    (trial_folder,) = (tmp_path / "ray").glob("ddp_kill-final/trial_*")
    assert _attempts(trial_folder / "error.txt") == 1
    reported = [int(json.loads(line)["epoch"]) for line in (trial_folder / "result.json").read_text().splitlines()
                if line.strip()]
    assert reported.count(1) == 1 and reported[-1] == 3, f"the retry restarted the trial: {reported}"


# ------------------------------------------------------------------ a joined cluster that cannot hold a worker

def test_a_joined_cluster_without_a_node_for_one_worker_exits_2(tmp_path):
    """``ray start --head --num-cpus 1`` (hand-started: no autoscaler) and ``--cpus-per-worker 4``.

    The head is this test's own (free ports, its own temporary directory, its own process
    group), stopped by signalling its processes, never with ``ray stop``.
    """
    from tests.integration.test_job_submit import base_env, ray_cli, stop_session

    gcs, dashboard, agent, client = free_ports(4)
    (tmp_path / "home").mkdir()
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # token authentication, as on the project's clusters (docs/cluster.md): head and study share the token
    env = {**base_env(tmp_path / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths must stay under 108 bytes
    log = tmp_path / "ray-start.log"
    head = subprocess.Popen([ray_cli(), "start", "--head", "--block", "--num-cpus", "1", "--port", str(gcs),
                             "--include-dashboard", "false", "--dashboard-port", str(dashboard),
                             "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
                             "--temp-dir", str(temp_dir), "--disable-usage-stats"],
                            env=env, cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        while not list(temp_dir.glob("session_latest/logs/raylet.out")):
            assert head.poll() is None, f"`ray start` exited with {head.returncode}:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        study_env = {**env, "SEMISEG_CACHE": str(tmp_path / "cache")}
        done = subprocess.run([sys.executable, str(REPO / "studies" / "ema_sweep.py"), *TINY_ARGS,
                               "--storage-path", str(tmp_path / "runs"), "--address", f"127.0.0.1:{gcs}",
                               "--cpus-per-worker", "4"], env=study_env, cwd=REPO, capture_output=True, text=True)
    finally:
        stop_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = _error_line(done.stderr)
    assert line == ("error: --workers-per-trial 1 --cpus-per-worker 4: no alive node of the cluster can hold one "
                    "worker (4 CPU(s)); its nodes: 1 CPU/0 GPU; the cluster cannot add nodes (no autoscaler, or "
                    "none of its node groups fits a worker)"), line
    assert not list((tmp_path / "runs").glob("ray/*")), "no trial was started"
