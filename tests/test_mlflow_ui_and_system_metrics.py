"""MLflow for a person following a study: the experiment's kind, the printed UI hint, system metrics."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from semiseg.config import ConfigError
from semiseg.tracking import (EXPERIMENT_KIND_MODEL_DEVELOPMENT, TAG_EXPERIMENT_KIND, Tracker, mlflow_ui_hint,
                              mlflow_ui_url, system_metrics, system_metrics_interval)
from semiseg.train.session import LocalSession
from semiseg.train.system_metrics import share_trial_run, shared_trial_run, trial_system_metrics


def test_experiments_are_tagged_as_model_development_also_when_they_exist(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", artifact_root=tmp_path)
    created = tracker.experiment_id("study")
    assert tracker.client.get_experiment(created).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND_MODEL_DEVELOPMENT
    older = tracker.client.create_experiment("older")
    assert TAG_EXPERIMENT_KIND not in tracker.client.get_experiment(older).tags
    assert tracker.experiment_id("older") == older
    assert tracker.client.get_experiment(older).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND_MODEL_DEVELOPMENT


def test_ui_hint_is_the_venv_command_and_the_runs_page():
    hint = mlflow_ui_hint("sqlite:////tmp/x.db", "7")
    command, url = hint.split("\n")
    mlflow = Path(sys.executable).parent / "mlflow"
    assert command.startswith(f"{mlflow} ui --backend-store-uri sqlite:////tmp/x.db --host 127.0.0.1 --port 5000")
    assert url.strip() == "then open http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert mlflow_ui_hint("https://alice:s3cret@host/mlflow/?token=x", "3") == (
        "open https://host/mlflow/#/experiments/3/runs?workflowType=machine_learning")
    assert mlflow_ui_url("sqlite:////tmp/x.db", None, port=5001) == "http://127.0.0.1:5001/"


def test_sampling_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SEMISEG_SYSTEM_METRICS_INTERVAL", raising=False)
    assert system_metrics_interval() == 10.0
    monkeypatch.setenv("SEMISEG_SYSTEM_METRICS_INTERVAL", "0.5")
    assert system_metrics_interval() == 0.5
    monkeypatch.setenv("SEMISEG_SYSTEM_METRICS_INTERVAL", "-1")
    with pytest.raises(ConfigError, match="SEMISEG_SYSTEM_METRICS_INTERVAL='-1'"):
        system_metrics_interval()


def _monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_system_metrics_are_logged_and_the_thread_is_gone_after(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", artifact_root=tmp_path)
    run = tracker.start_run(tracker.experiment_id("study"), "trial", {})
    stop = threading.Event()
    with system_metrics(run, tracker.tracking_uri, interval_s=0.2):
        assert len(_monitor_threads()) == 1
        stop.wait(0.7)
    assert _monitor_threads() == []
    metrics = tracker.client.get_run(run).data.metrics
    for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        history = tracker.client.get_metric_history(run, name)
        assert len(history) >= 2 and all(m.value >= 0 for m in history), name
        assert [m.step for m in history] == list(range(len(history))), "one step per sample"
    assert metrics["system/system_memory_usage_megabytes"] > 0
    with system_metrics(run, tracker.tracking_uri, interval_s=30):
        pass
    steps = [m.step for m in tracker.client.get_metric_history(run, "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps))) and len(steps) >= 3, "a shorter-than-interval stretch logs its sample"


def test_a_trial_without_a_shared_run_is_not_monitored(monkeypatch):
    import semiseg.train.system_metrics as system_metrics_module

    monkeypatch.setattr(system_metrics_module, "_kv", lambda: None)  # no Ray connection (another test may hold one)
    assert shared_trial_run("abc") is None and share_trial_run("abc", "run", "sqlite:///x", 1.0) is False
    with trial_system_metrics(LocalSession()):
        assert _monitor_threads() == []
