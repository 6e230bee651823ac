"""MLflow tracking: names, the guarded client, and an unreachable server."""

import math
import warnings

import pytest

from semiseg.tracking import Tracker, loggable_metrics, mlflow_ui_command


def test_loggable_metrics_keep_known_finite_numbers():
    result = {"val/dice": 0.5, "train/loss": 1.0, "epoch": 3, "diverged": 0.0, "time_this_iter_s": 2.0,
              "val/hd95": math.nan, "config": {"a": 1}, "trial_id": "x", "val/flag": True}
    assert loggable_metrics(result) == {"val/dice": 0.5, "train/loss": 1.0, "epoch": 3.0, "diverged": 0.0}


def test_ui_command_binds_loopback():
    assert "--host 127.0.0.1" in mlflow_ui_command("sqlite:////tmp/x.db")
    assert mlflow_ui_command("http://127.0.0.1:5000") == "open http://127.0.0.1:5000"


def test_sqlite_store_round_trip(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", artifact_root=tmp_path / "artifacts")
    experiment = tracker.experiment_id("study")
    assert tracker.experiment_id("study") == experiment
    run = tracker.start_run(experiment, "trial", {"semiseg.trial_id": "abc"})
    tracker.log_params(run, {f"p.{i}": i for i in range(150)})
    tracker.log_metrics(run, {"val/dice": 0.25}, step=2)
    tracker.log_json(run, {"a": 1}, "config.json")
    assert tracker.find_run(experiment, {"semiseg.trial_id": "abc"}) == run
    assert tracker.find_run(experiment, {"semiseg.trial_id": "other"}) is None
    data = tracker.client.get_run(run).data
    assert len(data.params) == 150 and data.metrics["val/dice"] == 0.25
    assert [a.path for a in tracker.client.list_artifacts(run)] == ["config.json"]
    assert (tmp_path / "artifacts" / "study").is_dir(), "artifacts go under the runs folder, not the cwd"


def test_unreachable_server_warns_once_and_disables():
    tracker = Tracker("http://127.0.0.1:9")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracker.reachable(timeout_s=2) is False
        assert tracker.experiment_id("study") is None
        assert tracker.start_run("1", "x", {}) is None
        tracker.log_metrics("r", {"val/dice": 1.0}, step=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "127.0.0.1:9" in messages[0] and "Ray's storage" in messages[0]
    assert tracker.enabled is False


def test_metric_names_of_groups_are_accepted_by_mlflow(tmp_path):
    from semiseg.tracking import metric_name

    name = metric_name("final/mean_teacher [data.num_labelled=4, method.pretrain_epochs=5]/dice_mean")
    assert name == "final/mean_teacher/data.num_labelled:4/method.pretrain_epochs:5/dice_mean"
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", artifact_root=tmp_path)
    run = tracker.start_run(tracker.experiment_id("s"), "r", {})
    tracker.log_metrics(run, {name: 0.5}, step=0)
    assert tracker.client.get_run(run).data.metrics[name] == 0.5


def test_a_rejected_request_warns_but_keeps_tracking(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", artifact_root=tmp_path)
    run = tracker.start_run(tracker.experiment_id("s"), "r", {})
    with pytest.warns(RuntimeWarning, match="rejected"):
        tracker.log_metrics(run, {"bad [name]": 1.0}, step=0)
    assert tracker.enabled
    tracker.log_metrics(run, {"val/dice": 0.5}, step=1)
    assert tracker.client.get_run(run).data.metrics["val/dice"] == 0.5


def test_tracker_pickles_without_its_client(tmp_path):
    import pickle

    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", artifact_root=tmp_path)
    tracker.experiment_id("s")
    copy = pickle.loads(pickle.dumps(tracker))
    assert copy._client is None and copy.experiment_id("s") == tracker.experiment_id("s")


def test_runs_of_trials_the_experiment_lost_are_closed_as_orphaned(tmp_path):
    from types import SimpleNamespace

    from semiseg.tracking import trial_tags
    from semiseg.tune.callbacks import MlflowTrialCallback

    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", artifact_root=tmp_path / "artifacts")
    experiment = tracker.experiment_id("study")
    parent = tracker.start_run(experiment, "study", {"semiseg.role": "study"})
    runs = {trial: tracker.start_run(experiment, f"search-{trial}",
                                     trial_tags("study", "mean_teacher", trial, "search", parent, "phantom"))
            for trial in ("kept", "lost", "done")}
    tracker.end_run(runs["done"], "FINISHED")
    other_phase = tracker.start_run(experiment, "final-x", trial_tags("study", "mt", "x", "final", parent, "p"))
    callback = MlflowTrialCallback(tracker, experiment, parent, "study", "search", "phantom", max_epochs=3)
    callback.on_experiment_end(trials=[SimpleNamespace(trial_id="kept")])
    status = {trial: tracker.client.get_run(run_id) for trial, run_id in runs.items()}
    assert status["lost"].info.status == "KILLED" and status["lost"].data.tags["semiseg.status"] == "orphaned"
    assert status["kept"].info.status == "RUNNING" and "semiseg.status" not in status["kept"].data.tags
    assert status["done"].info.status == "FINISHED", "a finished run of a lost trial keeps its status"
    assert tracker.client.get_run(other_phase).info.status == "RUNNING", "other phases are not touched"


def test_an_epoch_re_reported_after_a_retry_is_logged_once(tmp_path):
    from types import SimpleNamespace

    from semiseg.tune.callbacks import MlflowTrialCallback

    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", artifact_root=tmp_path / "artifacts")
    experiment = tracker.experiment_id("study")
    parent = tracker.start_run(experiment, "study", {"semiseg.role": "study"})
    callback = MlflowTrialCallback(tracker, experiment, parent, "study", "final", "phantom", max_epochs=4)
    trial = SimpleNamespace(trial_id="t1", config={"method.name": "mean_teacher"})
    for epoch, dice in [(1, 0.1), (2, 0.2), (3, 0.3), (3, 0.3), (4, 0.4)]:
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "val/dice": dice})
    history = tracker.client.get_metric_history(callback.run_ids["t1"], "val/dice")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert callback.trial_status("t1") == "completed"
