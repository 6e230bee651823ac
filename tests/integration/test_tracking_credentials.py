"""A tracking URI with credentials: the study is tracked, and the password is written, printed and sent nowhere.

A real ``mlflow server`` listens behind a small proxy on 127.0.0.1 that demands HTTP Basic auth
(``alice`` / the password) on every request and forwards the authorised ones without the header.
So a tracked study proves that the health probe and MLflow's client both send the URI's
credentials; the server (its SQLite store and artifacts) and the study's folders are then read
byte by byte for the password.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.conftest import REPO
from tests.integration.test_mlflow_server import HOST, rest, running_mlflow_server, tags_of

pytestmark = pytest.mark.integration

USER = "alice"
PASSWORD = "s3cret-pw-7Qx"
STUDY_NAME = "ema_sweep"
TINY = ["--smoke", "--num-samples", "1", "--final-seeds", "0", "--skip-baselines", "--max-epochs", "1",
        "--set", "data.phantom_shape=32x32x4", "--set", "data.phantom_cases=12", "--set", "data.num_validation=2",
        "--set", "data.num_test=2", "--set", "model.width=4"]
DROPPED_HEADERS = {"authorization", "host", "transfer-encoding", "content-length", "connection", "keep-alive"}


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes | None:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(handler.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline().strip():
                    pass
                return body
            body += handler.rfile.read(size)
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else None


def start_auth_proxy(upstream_port: int) -> tuple[http.server.ThreadingHTTPServer, list[str | None]]:
    """A proxy to ``127.0.0.1:upstream_port`` that answers 401 unless Basic auth is USER:PASSWORD."""
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    seen: list[str | None] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            body = _read_body(self)
            auth = self.headers.get("Authorization")
            seen.append(auth)
            if auth != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in DROPPED_HEADERS}
            upstream = http.client.HTTPConnection(HOST, upstream_port, timeout=120)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
            finally:
                upstream.close()
            self.send_response(reply.status)
            for key, value in reply.getheaders():
                if key.lower() not in DROPPED_HEADERS:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), Proxy)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory) -> Iterator[tuple[str, int, Path, list]]:
    """(upstream URL, proxy port, server folder, Authorization headers the proxy saw)."""
    folder = tmp_path_factory.mktemp("mlflow-guarded")
    with running_mlflow_server(folder) as url:
        proxy, seen = start_auth_proxy(int(url.rsplit(":", 1)[1]))
        try:
            yield url, proxy.server_address[1], folder, seen
        finally:
            proxy.shutdown()
            proxy.server_close()


def files_holding(folder: Path, secret: bytes) -> list[str]:
    """Every file under ``folder`` whose bytes contain ``secret`` (text, databases, pickles alike)."""
    return [str(path) for path in folder.rglob("*") if path.is_file() and secret in path.read_bytes()]


def test_credentials_in_the_uri_track_the_study_and_leak_nowhere(guarded_server, tmp_path):
    upstream, proxy_port, server_folder, seen = guarded_server
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{HOST}:{proxy_port}/health", timeout=5)
    assert refused.value.code == 401, "the proxy refuses requests without the credentials"

    tracking_uri = f"http://{USER}:{PASSWORD}@{HOST}:{proxy_port}"
    storage, state = tmp_path / "storage", tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update({"SEMISEG_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"})
    done = subprocess.run([sys.executable, str(REPO / "studies" / f"{STUDY_NAME}.py"), "--storage-path",
                           str(storage), "--state-dir", str(state), "--tracking-uri", tracking_uri, *TINY],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert PASSWORD not in output, [line for line in output.splitlines() if PASSWORD in line]
    assert f"{USER}:***@{HOST}:{proxy_port}" in done.stdout, "the URI is shown, redacted"
    assert "unreachable" not in output and "tracking is off" not in output, output[-4000:]
    assert seen and all(auth is not None for auth in seen[1:]), "every request of the study was authenticated"

    experiment = rest(upstream, "experiments/get-by-name", {"experiment_name": STUDY_NAME})["experiment"]
    runs = rest(upstream, "runs/search", body={"experiment_ids": [experiment["experiment_id"]],
                                               "max_results": 100}).get("runs", [])
    parents = [r for r in runs if tags_of(r).get("semiseg.role") == "study"]
    children = [r for r in runs if tags_of(r).get("semiseg.role") == "trial"]
    assert len(parents) == 1 and len(children) == 1, [tags_of(r) for r in runs]
    assert tags_of(children[0])["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
    assert children[0]["info"]["status"] == "FINISHED"
    assert any(m["key"] == "val/dice" for m in children[0]["data"]["metrics"])
    listing = rest(upstream, "artifacts/list", {"run_id": parents[0]["info"]["run_id"]})
    assert "results.json" in {f["path"] for f in listing.get("files", [])}

    secret = PASSWORD.encode()
    assert files_holding(server_folder, secret) == [], "no param, tag, run or artifact on the server holds it"
    assert files_holding(state, secret) == [] and files_holding(storage, secret) == []
    results = json.loads((state / STUDY_NAME / "results.json").read_text())
    assert results["tracking_uri"] == f"http://{USER}:***@{HOST}:{proxy_port}"
    saved = json.loads((state / STUDY_NAME / "study_state.json").read_text())
    assert saved["tracking_uri"] == results["tracking_uri"] and saved["parent_run_id"]

    page = tmp_path / "report.html"
    report = subprocess.run([sys.executable, str(REPO / "dashboards" / "study_report.py"), "--tracking-uri",
                             tracking_uri, "--study", STUDY_NAME, "--out", str(page)],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert report.returncode == 0, report.stderr[-3000:]
    assert PASSWORD not in report.stdout + report.stderr + page.read_text()
    assert f"{USER}:***@{HOST}:{proxy_port}" in page.read_text(), "the report names its store, redacted"
