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


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://alice:s3cret@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
    ("https://alice:p%40ss%3Aw@mlflow.example.org/prefix/", "https://alice:***@mlflow.example.org/prefix/"),
    ("postgresql://bob:pw@db.example.org:5432/mlflow", "postgresql://bob:***@db.example.org:5432/mlflow"),
    ("mysql+pymysql://bob:pw@db/mlflow?charset=utf8", "mysql+pymysql://bob:***@db/mlflow?charset=utf8"),
    ("https://ghp_token123@host/x", "https://***@host/x"),
    ("http://host:5000/?token=abc&x=1&password=p&sig=zz", "http://host:5000/?token=***&x=1&password=***&sig=***"),
    ("mssql+pyodbc://db/?odbc_connect=DRIVER%3Dx%3BPWD%3Dhunter2", "mssql+pyodbc://db/?odbc_connect=***"),
    ("sqlite:////abs/runs/mlflow.db", "sqlite:////abs/runs/mlflow.db"),
    ("/abs/runs/mlruns", "/abs/runs/mlruns"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("", ""),
])
def test_redact_uri_hides_every_secret(uri, shown):
    from semiseg.tracking import redact_uri, scrub

    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown, "idempotent"
    for secret in ("s3cret", "p@ss:w", "p%40ss%3Aw", "ghp_token123", "hunter2"):
        assert secret not in shown
        assert secret not in scrub(f"request to {uri}/api failed: {uri.split('@')[0]}", uri)


def test_ui_command_and_warnings_never_show_the_password():
    assert mlflow_ui_command("http://alice:s3cret@127.0.0.1:5000") == "open http://alice:***@127.0.0.1:5000"
    assert "s3cret" not in mlflow_ui_command("postgresql://alice:s3cret@db/mlflow")
    tracker = Tracker("http://alice:s3cret@127.0.0.1:9")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracker.reachable(timeout_s=2) is False
    (message,) = [str(w.message) for w in caught]
    assert "unreachable" in message and "alice:***@127.0.0.1:9" in message and "s3cret" not in message


@pytest.fixture()
def health_server():
    """A tiny HTTP server on 127.0.0.1: GET /health answers 200 if the Basic credentials are alice:s3cret."""
    import base64
    import http.server
    import threading

    seen: list[tuple[str, str | None]] = []
    good = "Basic " + base64.b64encode(b"alice:s3cr@t").decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            auth = self.headers.get("Authorization")
            seen.append((self.path, auth))
            ok = self.path == "/health" and auth in (good, "Bearer tok-123")
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"no")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_probe_sends_the_uri_credentials_as_basic_auth(health_server, monkeypatch):
    port, seen = health_server
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert Tracker(f"http://alice:s3cr%40t@127.0.0.1:{port}/").reachable(timeout_s=5) is True
    assert seen[-1][0] == "/health", "the userinfo is not part of the requested URL"
    with pytest.warns(RuntimeWarning, match="unreachable") as caught:
        assert Tracker(f"http://alice:wrong@127.0.0.1:{port}").reachable(timeout_s=5) is False
    assert "wrong" not in str(caught[0].message)


def test_probe_uses_mlflows_environment_credentials(health_server, monkeypatch):
    port, seen = health_server
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr@t")
    assert Tracker(f"http://127.0.0.1:{port}").reachable(timeout_s=5) is True
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    assert Tracker(f"http://127.0.0.1:{port}").reachable(timeout_s=5) is True
    assert seen[-1] == ("/health", "Bearer tok-123")


def test_mlflow_client_sends_the_same_credentials_as_the_probe(health_server, monkeypatch):
    """What the probe assumes of MLflow's REST client: a userinfo becomes the Basic auth it sends."""
    port, seen = health_server
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(f"http://alice:s3cr%40t@127.0.0.1:{port}")
    tracker.reachable(timeout_s=5)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        tracker.experiment_id("study")
    import base64

    client_auth = [auth for path, auth in seen if path.startswith("/api/")]
    assert client_auth and client_auth[0] == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert seen[0][1] == client_auth[0]


def test_tracker_pickles_without_the_secret_and_gets_it_back_in_this_process(tmp_path):
    import pickle

    from semiseg import tracking

    tracker = Tracker("http://alice:pickled-pw@127.0.0.1:9")
    data = pickle.dumps(tracker)
    assert b"pickled-pw" not in data and b"alice:***@127.0.0.1:9" in data
    assert pickle.loads(data).tracking_uri == "http://alice:pickled-pw@127.0.0.1:9"
    tracking._KNOWN_URIS.pop("http://alice:***@127.0.0.1:9")
    assert pickle.loads(data).tracking_uri == "http://alice:***@127.0.0.1:9", "never a guessed secret"


@pytest.mark.parametrize("uri", ["sqlite:////tmp/x.db", "/tmp/mlruns", "relative/mlruns", "file:///tmp/mlruns",
                                 "http://127.0.0.1:9", "https://alice:pw@host", "databricks", "databricks://profile",
                                 "sqlite+pysqlite:////tmp/x.db", None])
def test_tracking_uris_mlflow_accepts_pass_the_check(uri):
    from semiseg.tracking import check_tracking_uri

    check_tracking_uri(uri)


def test_unknown_scheme_is_refused_naming_the_redacted_uri_and_the_schemes():
    from semiseg.config import ConfigError
    from semiseg.tracking import check_tracking_uri

    with pytest.raises(ConfigError) as caught:
        check_tracking_uri("garbage://alice:s3cret@x")
    message = str(caught.value)
    assert "garbage://alice:***@x" in message and "s3cret" not in message
    assert all(scheme in message for scheme in ("http", "https", "sqlite", "postgresql", "mysql", "databricks"))


def test_database_without_its_driver_is_refused_naming_the_package(monkeypatch):
    import importlib.util

    from semiseg.config import ConfigError
    from semiseg.tracking import check_tracking_uri

    if importlib.util.find_spec("psycopg") or importlib.util.find_spec("MySQLdb"):
        pytest.skip("a database driver is installed here")
    with pytest.raises(ConfigError, match=r"psycopg.*pip install 'psycopg\[binary\]'") as caught:
        check_tracking_uri("postgresql://alice:s3cret@db.example.org/mlflow")
    assert "s3cret" not in str(caught.value) and "alice:***@db.example.org" in str(caught.value)
    with pytest.raises(ConfigError, match="pip install mysqlclient"):
        check_tracking_uri("mysql://alice:s3cret@db/mlflow")
    with pytest.raises(ConfigError, match="no driver"):
        check_tracking_uri("postgresql+nosuchdriver://db/mlflow")
