"""`ray job submit` of a study to a real `ray start --head` cluster with token authentication.

The cluster is started for this module only, on free ports and in its own temporary
directory, so it neither meets the in-process Ray of the other integration tests nor any
other Ray on the machine; it is stopped by signalling the processes it consists of (never
with `ray stop`, which ends every Ray process of the machine).

The job's runtime environment is read from docs/cluster.md, so the documented submission is
the tested one. semiseg is also installed (editable) in the interpreter that runs the cluster,
which would hide a broken runtime environment: the job reports where its driver and a Ray
worker import semiseg from, and both must be the uploaded copy.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.conftest import study_runs

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "cluster.md"
TINY = ["--smoke", "--set", "data.phantom_shape=32x32x4", "--set", "data.phantom_cases=12",
        "--set", "data.num_validation=2", "--set", "data.num_test=2", "--set", "model.width=4"]
STOP_TIMEOUT_S = 60
POLL_S = 3
PROBE_SCRIPT = "semiseg_job_probe.py"
PROBE_TAG = "SEMISEG_JOB_PROBE"
DECOYS = (".git", ".venv", "runs", "mlruns")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

PROBE_SOURCE = f'''"""Reports where the job's driver and a Ray worker import semiseg from."""

import json
import os

import ray

import semiseg


@ray.remote(num_cpus=1)
def worker_semiseg_file():
    """semiseg's file as a Ray worker of this job imports it."""
    import semiseg as imported

    return imported.__file__


ray.init()
report = {{"driver": semiseg.__file__, "worker": ray.get(worker_semiseg_file.remote()),
          "uploaded_decoys": sorted(name for name in {list(DECOYS)!r} if os.path.exists(name))}}
ray.shutdown()
print("{PROBE_TAG}", json.dumps(report), flush=True)
'''


def documented_runtime_env() -> dict:
    """The ``RUNTIME_ENV='...'`` of docs/cluster.md, parsed."""
    match = re.search(r"^RUNTIME_ENV='(\{.*\})'$", DOCS.read_text(), flags=re.MULTILINE)
    assert match, f"{DOCS} shows no RUNTIME_ENV='{{...}}' line"
    return json.loads(match.group(1))


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def ray_cli() -> str:
    """The ``ray`` command of the interpreter running the tests."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    assert found, "no `ray` command (install ray[default])"
    return found


def base_env(home: Path) -> dict[str, str]:
    """The environment without any Ray setting, PYTHONPATH or token, this interpreter first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HOME"] = str(home)
    return env


def session_members(session_id: int) -> list[int]:
    """Process ids of the session ``session_id`` (Linux /proc); empty where /proc is missing."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 3 and int(fields[3]) == session_id:
            members.append(int(entry.name))
    return members


def stop_session(process: subprocess.Popen) -> None:
    """End ``ray start --block`` (it stops its own processes), then whatever of its session is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (left := session_members(process.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@dataclass
class TokenCluster:
    """A local head node with token authentication, and how to talk to it."""

    address: str
    token: str
    token_file: Path
    temp_dir: Path
    home: Path
    log: Path

    def auth_env(self) -> dict[str, str]:
        """Environment of a job CLI that authenticates (token mode, token in a variable)."""
        return {**base_env(self.home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def cli(self, args: list[str], env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``ray <args>`` against this cluster (authenticated unless ``env`` says otherwise)."""
        return subprocess.run([ray_cli(), *args], env=env if env is not None else self.auth_env(), cwd=cwd,
                              capture_output=True, text=True)

    def job_status(self, submission_id: str) -> str:
        """The job's status from the REST API (with the bearer token)."""
        request = urllib.request.Request(f"{self.address}/api/jobs/{submission_id}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["status"]

    def log_tail(self, chars: int = 4000) -> str:
        """The end of ``ray start``'s output (for failure messages)."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory) -> Iterator[TokenCluster]:
    """``ray start --head --block`` with RAY_AUTH_MODE=token and a fresh token, on free ports."""
    root = tmp_path_factory.mktemp("ray")
    home = root / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    gcs_port, dashboard_port, agent_port, client_port = free_ports(4)
    env = {**base_env(Path.home()), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "SEMISEG_CACHE": str(root / "semiseg-cache")}
    log = root / "ray-start.log"
    command = [ray_cli(), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--include-dashboard", "true", "--dashboard-agent-listen-port", str(agent_port),
               "--ray-client-server-port", str(client_port), "--temp-dir", str(root / "t"),
               "--disable-usage-stats"]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    cluster = TokenCluster(address=f"http://127.0.0.1:{dashboard_port}", token=token, token_file=token_file,
                           temp_dir=root / "t", home=home, log=log)
    try:
        while True:
            assert process.poll() is None, f"`ray start` exited with {process.returncode}:\n{cluster.log_tail()}"
            if cluster.cli(["job", "list", "--address", cluster.address]).returncode == 0:
                break
            time.sleep(POLL_S)
        yield cluster
    finally:
        stop_session(process)


def copy_worktree(dest: Path) -> Path:
    """The repository's files as git sees them (tracked and untracked, not ignored) under ``dest``."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True)
    if listed.returncode == 0:
        for relative in filter(None, listed.stdout.decode().split("\0")):
            source = REPO / relative
            if source.is_file():
                (dest / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / relative)
    else:
        shutil.copytree(REPO, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "semiseg_runs", "__pycache__", "*.egg-info", ".pytest_cache"))
    assert (dest / "studies" / "ema_sweep.py").is_file() and (dest / "platform" / "semiseg").is_dir()
    return dest


def client_env(cluster: TokenCluster, home: Path, settings: dict[str, str]) -> dict[str, str]:
    """A job CLI's environment from ``settings``, with placeholders for the cluster's token.

    ``<token>`` and ``<token file>`` in values are replaced by the token and its file; the key
    ``<home token>`` writes the token to ``<home>/.ray/auth_token`` instead of setting a variable.
    """
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    env = base_env(home)
    for key, value in settings.items():
        if key == "<home token>":
            (home / ".ray" / "auth_token").write_text(cluster.token)
        else:
            env[key] = value.replace("<token file>", str(cluster.token_file)).replace("<token>", cluster.token)
    return env


REFUSED = {
    "no token": ({}, "Missing authentication token"),
    "RAY_AUTH_TOKEN without RAY_AUTH_MODE": ({"RAY_AUTH_TOKEN": "<token>"}, "Missing authentication token"),
    "~/.ray/auth_token without RAY_AUTH_MODE": ({"<home token>": "1"}, "Missing authentication token"),
    "a wrong token": ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                      "Invalid authentication token"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_submission_without_the_token_is_refused(token_cluster, tmp_path, case):
    settings, expected = REFUSED[case]
    env = client_env(token_cluster, tmp_path / "home", settings)
    marker = f"refused-{uuid.uuid4().hex[:8]}"
    submitted = token_cluster.cli(["job", "submit", "--address", token_cluster.address, "--no-wait",
                                   "--submission-id", marker, "--", "echo", marker], env=env)
    assert submitted.returncode != 0
    assert expected in submitted.stdout + submitted.stderr
    listed = token_cluster.cli(["job", "list", "--address", token_cluster.address])
    assert listed.returncode == 0 and marker not in listed.stdout + listed.stderr


ACCEPTED = {
    "RAY_AUTH_MODE + RAY_AUTH_TOKEN": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "<token>"},
    "RAY_AUTH_MODE + RAY_AUTH_TOKEN_PATH": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "<token file>"},
    "RAY_AUTH_MODE + ~/.ray/auth_token": {"RAY_AUTH_MODE": "token", "<home token>": "1"},
}


@pytest.mark.parametrize("case", sorted(ACCEPTED) + ["Authorization header"])
def test_the_job_api_accepts_the_documented_token_settings(token_cluster, tmp_path, case):
    settings = ACCEPTED.get(case, {})
    env = client_env(token_cluster, tmp_path / "home", settings)
    extra = ["--headers", json.dumps({"Authorization": f"Bearer {token_cluster.token}"})] if not settings else []
    listed = token_cluster.cli(["job", "list", "--address", token_cluster.address, *extra], env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]


def test_a_submitted_study_imports_the_uploaded_code_and_logs_to_mlflow(token_cluster, tmp_path):
    workdir = copy_worktree(tmp_path / "workdir")
    for decoy in DECOYS:
        (workdir / decoy).mkdir(exist_ok=True)
        (workdir / decoy / "decoy.txt").write_text("must not be uploaded")
    (workdir / PROBE_SCRIPT).write_text(PROBE_SOURCE)
    outputs = tmp_path / "outputs"
    tracking_uri = f"sqlite:///{outputs / 'mlflow.db'}"
    study = ["python", "studies/ema_sweep.py", "--storage-path", str(outputs / "runs"),
             "--tracking-uri", tracking_uri, *TINY]
    submission_id = f"semiseg-test-{uuid.uuid4().hex[:12]}"

    submitted = token_cluster.cli(
        ["job", "submit", "--address", token_cluster.address, "--submission-id", submission_id, "--no-wait",
         "--working-dir", ".", "--runtime-env-json", json.dumps(documented_runtime_env()),
         "--", "sh", "-c", f"python {PROBE_SCRIPT} && {shlex.join(study)}"], cwd=workdir)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]

    status = "PENDING"
    try:
        while status not in TERMINAL:
            time.sleep(POLL_S)
            try:
                status = token_cluster.job_status(submission_id)
            except (urllib.error.URLError, TimeoutError):
                continue
    finally:
        if status not in TERMINAL:
            token_cluster.cli(["job", "stop", "--address", token_cluster.address, "--no-wait", submission_id])
    logs = token_cluster.cli(["job", "logs", "--address", token_cluster.address, submission_id])
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert status == "SUCCEEDED", f"job {submission_id} ended {status}; entrypoint " \
                                  f"{shlex.join(study)}\n{logs.stdout[-6000:]}"

    (report_line,) = [line for line in logs.stdout.splitlines() if line.startswith(PROBE_TAG)]
    report = json.loads(report_line.removeprefix(PROBE_TAG))
    uploads = (token_cluster.temp_dir.resolve(), "runtime_resources")
    for role in ("driver", "worker"):
        imported = Path(report[role]).resolve()
        assert imported.is_relative_to(uploads[0]) and uploads[1] in imported.parts, (
            f"the job's {role} imported semiseg from {imported}, not from the uploaded code")
        assert not imported.is_relative_to(REPO)
    assert report["uploaded_decoys"] == [], "run outputs and local environments must not be uploaded"

    assert (outputs / "mlflow.db").is_file(), f"the job logged nothing to {tracking_uri}:\n{logs.stdout[-6000:]}"
    results = outputs / "runs" / "ema_sweep" / "results.json"
    assert results.is_file(), f"the job wrote no {results}:\n{logs.stdout[-6000:]}"
    trials = json.loads(results.read_text())["trials"]
    client, parents, children = study_runs(tracking_uri, "ema_sweep")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == len(trials) >= 3, "one child run per trial: searched ones and the baseline at least"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {"mean_teacher", "supervised"} <= {c.data.tags["semiseg.method"] for c in children}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val/dice")
        steps = [m.step for m in history]
        assert steps and steps == sorted(set(steps)) and steps[0] == 1, steps
        assert all(0.0 <= m.value <= 1.0 for m in history)
