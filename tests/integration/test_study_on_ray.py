"""A tiny study on a real local Ray, logged to a real MLflow store."""

from __future__ import annotations

import optuna
import pytest

from semiseg.tune import run_study
from tests.integration.conftest import load_study, study_runs

pytestmark = pytest.mark.integration
TINY = ["--smoke", "--set", "data.phantom_shape=32x32x4", "--set", "data.phantom_cases=12",
        "--set", "data.num_validation=2", "--set", "data.num_test=2", "--set", "model.width=4"]


def test_smoke_ema_sweep_leaves_parent_and_child_runs(ray_local, mlflow_store, tmp_path):
    study = load_study("ema_sweep").STUDY
    outcome = run_study(study, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store, *TINY])
    client, parents, children = study_runs(mlflow_store, "ema_sweep")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["semiseg.study"] == "ema_sweep"
    assert len(children) == 4, "2 searched trials, then the best one and the baseline re-run"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    methods = sorted(c.data.tags["semiseg.method"] for c in children)
    assert methods == ["mean_teacher"] * 3 + ["supervised"]
    phases = sorted(c.data.tags["semiseg.phase"] for c in children)
    assert phases == ["final", "final", "search-mean_teacher", "search-mean_teacher"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val/dice")
        assert [m.step for m in history] == [1, 2, 3]
        assert all(0.0 <= m.value <= 1.0 for m in history)
        assert child.data.params["method.name"] == child.data.tags["semiseg.method"]
        assert child.data.params["train.max_epochs"] == "3"
        assert {"config.json", "overlay.png"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
        assert child.data.metrics["summary/val_dice_best"] == max(m.value for m in history)
    searched = [c for c in children if c.data.tags["semiseg.phase"].startswith("search")]
    decays = {float(c.data.params["method.ema_decay"]) for c in searched}
    assert len(decays) == 2 and all(0.9 <= d <= 0.9999 for d in decays)
    assert "final/supervised/dice_mean" in parent.data.metrics and "best/val_dice" in parent.data.metrics

    assert outcome.best is not None and outcome.best.method == "mean_teacher"
    assert outcome.registered_models == ["semiseg-ema_sweep-mean_teacher", "semiseg-ema_sweep-supervised"]
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(mlflow_store)
    model = mlflow.pytorch.load_model("models:/semiseg-ema_sweep-mean_teacher/1")
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    assert len(outcome.rows) == 4 and all(r.epochs == 3 for r in outcome.rows)
    assert set(outcome.final) == {"mean_teacher", "supervised"}
    final_mt = [r for r in outcome.rows if r.phase == "final" and r.method == "mean_teacher"]
    assert final_mt[0].config["method.ema_decay"] == outcome.best.config["method.ema_decay"]
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'ema_sweep' / 'optuna.db'}")
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 2
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(sorted(t.intermediate_values) == [1, 2, 3] for t in trials)


def test_two_ddp_trials_in_sequence_on_exactly_fitting_cpus(tmp_path):
    """Two 2-worker DDP trials one after the other on 2 CPUs, in the study's own local Ray.

    ASHA stops each trial at its last epoch, which kills the trial's Ray Train controller; the
    worker group's placement group is freed only through the State API (the local Ray's
    dashboard). Without it the second trial waited for workers forever (Ray #54305): the
    behaviour asserted is that both trials complete their epochs (a hang ends at pytest-timeout).
    """
    import json
    import os
    import subprocess
    import sys

    from tests.integration.conftest import REPO

    command = [sys.executable, str(REPO / "studies" / "ema_sweep.py"), "--storage-path", str(tmp_path),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *TINY, "--workers-per-trial", "2",
               "--num-samples", "2", "--max-concurrent", "1", "--skip-baselines", "--final-seeds", "0",
               "--set", "train.max_epochs=2"]
    env = {**os.environ, "SEMISEG_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "ema_sweep" / "results.json").read_text())["trials"]
    assert len(rows) == 2
    assert all(row["epochs"] == 2 and row["status"] == "completed" for row in rows)
    assert all(0.0 <= row["best_val_dice"] <= 1.0 for row in rows)
    ddp_runs = list((tmp_path / "ray").glob("ddp-*"))
    assert len(ddp_runs) == 2, "each DDP trial runs a named Ray Train run (resumable by name)"
