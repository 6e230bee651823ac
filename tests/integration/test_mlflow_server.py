"""A study logging to a real ``mlflow server`` over HTTP, checked through the server's REST API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from semiseg.tune import run_study
from tests.integration.conftest import REPO, load_study

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
STOP_TIMEOUT_S = 30
STUDY_NAME = "ema_sweep"
TINY = ["--smoke", "--set", "data.phantom_shape=32x32x4", "--set", "data.phantom_cases=14",
        "--set", "data.num_validation=2", "--set", "data.num_test=2", "--set", "model.width=4",
        "--set", "train.max_epochs=2"]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether ``url/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def stop(process: subprocess.Popen) -> None:
    """Stop the server's process group (the server and its workers), bounded."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_mlflow_server(folder: Path) -> Iterator[str]:
    """A real ``mlflow server`` on a SQLite store in ``folder``, on 127.0.0.1 only; yields its URL."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed in teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'm.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", HOST, "--port", str(port),
         "--workers", "1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not healthy(url):
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n"
                            + (folder / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield url
    finally:
        stop(process)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """A real ``mlflow server`` on a SQLite store, listening on 127.0.0.1 only."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


def rest(url: str, endpoint: str, query: dict | None = None, body: dict | None = None) -> dict:
    """GET (or POST ``body`` to) ``url/api/2.0/mlflow/<endpoint>`` and decode the JSON reply."""
    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        address += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as reply:
        return json.loads(reply.read().decode() or "{}")


def tags_of(run: dict) -> dict[str, str]:
    """A REST run's tags as a dict."""
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics_of(run: dict) -> dict[str, float]:
    """A REST run's latest metrics as a dict."""
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


@pytest.fixture(scope="module")
def study(server: str, ray_local, tmp_path_factory):
    """The smoke study, logged to the server; returns (outcome, its storage folder)."""
    folder = tmp_path_factory.mktemp("server-study")
    outcome = run_study(load_study(STUDY_NAME).STUDY,
                        ["--storage-path", str(folder), "--tracking-uri", server, *TINY])
    return outcome, folder


def all_runs(server: str) -> tuple[str, list[dict]]:
    """(experiment id, every run of the study's experiment) through the REST API."""
    experiment = rest(server, "experiments/get-by-name", {"experiment_name": STUDY_NAME})["experiment"]
    runs = rest(server, "runs/search", body={"experiment_ids": [experiment["experiment_id"]],
                                             "max_results": 1000}).get("runs", [])
    return experiment["experiment_id"], runs


def test_runs_tags_and_metric_histories_are_on_the_server(server: str, study):
    outcome, _ = study
    _, runs = all_runs(server)
    parents = [r for r in runs if tags_of(r).get("semiseg.role") == "study"]
    assert len(parents) == 1, [tags_of(r) for r in runs]
    parent = parents[0]
    assert parent["info"]["run_id"] == outcome.parent_run_id
    assert tags_of(parent)["semiseg.study"] == STUDY_NAME
    assert {"mean_teacher", "supervised"} <= set(tags_of(parent)["semiseg.method"].split(","))
    assert any(k.startswith("final/") for k in metrics_of(parent)), "the final table is logged on the parent"
    children = [r for r in runs if tags_of(r).get("mlflow.parentRunId") == outcome.parent_run_id]
    assert len(children) == len(outcome.rows)
    phases = {tags_of(c)["semiseg.phase"] for c in children}
    assert phases == {"search-mean_teacher", "final"}
    for child in children:
        tags = tags_of(child)
        assert tags["semiseg.role"] == "trial" and tags["semiseg.study"] == STUDY_NAME
        assert tags["semiseg.status"] in ("completed", "stopped_early")
        assert child["info"]["status"] == "FINISHED"
        history = rest(server, "metrics/get-history", {"run_id": child["info"]["run_id"],
                                                       "metric_key": "val/dice"})["metrics"]
        steps = sorted(int(m["step"]) for m in history)
        assert steps == list(range(1, len(steps) + 1)) and steps, "one val/dice per epoch, step = epoch"
        if tags["semiseg.status"] == "completed":
            assert "test/dice" in metrics_of(child)


def test_results_artifact_and_registered_models(server: str, study):
    outcome, folder = study
    listing = rest(server, "artifacts/list", {"run_id": outcome.parent_run_id})
    assert "results.json" in {f["path"] for f in listing.get("files", [])}
    results = json.loads((folder / STUDY_NAME / "results.json").read_text())
    expected = results.get("registered_models") or results.get("summary", {}).get("registered_models") or []
    models = rest(server, "registered-models/search",
                  {"filter": f"name LIKE 'semiseg-{STUDY_NAME}-%'", "max_results": 100}).get("registered_models", [])
    found = {m["name"] for m in models}
    assert set(expected) <= found, f"the study registered {expected}; the server has {sorted(found)}"
    for name in expected:
        assert name.startswith(f"semiseg-{STUDY_NAME}-")
        versions = rest(server, "model-versions/search", {"filter": f"name = '{name}'"})["model_versions"]
        run_ids = {v.get("run_id") for v in versions}
        children = {r["info"]["run_id"] for r in all_runs(server)[1]
                    if tags_of(r).get("mlflow.parentRunId") == outcome.parent_run_id}
        assert run_ids & children, f"{name} comes from one of the study's trial runs"


def test_report_renders_from_the_server(server: str, study, tmp_path: Path):
    out = tmp_path / "report.html"
    done = subprocess.run([sys.executable, str(REPO / "dashboards" / "study_report.py"), "--tracking-uri", server,
                           "--study", STUDY_NAME, "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    page = out.read_text()
    assert 'class="methods"' in page and "supervised" in page and "mean_teacher" in page
