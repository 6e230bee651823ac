"""Ctrl+C stops a study: not just the running search (Tune's own answer), but the study, with the command that resumes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import REPO
from tests.integration.test_fault_tolerance import TINY_ARGS

pytestmark = pytest.mark.integration


def test_sigint_stops_the_study_and_prints_how_to_resume(tmp_path):
    storage = tmp_path / "runs"
    command = [sys.executable, str(REPO / "studies" / "method_comparison.py"), "--storage-path", str(storage),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--methods", "mean_teacher,pi_model",
               "--max-concurrent", "1", *TINY_ARGS, "--set", "train.max_epochs=60"]
    env = {**os.environ, "SEMISEG_CACHE": str(tmp_path / "cache")}
    study = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while study.poll() is None and time.monotonic() < deadline:
            if any((storage / "ray").glob("method_comparison-search-mean_teacher/trial_*/checkpoint_*")):
                break
            time.sleep(0.1)
        assert study.poll() is None, "the study ended before it could be interrupted"
        study.send_signal(signal.SIGINT)
        stdout, stderr = study.communicate(timeout=300)
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
            study.wait()
    assert study.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "stopped during search-mean_teacher" in stderr
    resume_line = stderr.strip().splitlines()[-1].strip()
    assert resume_line.endswith("--resume") and str(REPO / "studies" / "method_comparison.py") in resume_line
    assert not any((storage / "ray").glob("method_comparison-search-pi_model")), "the next search must not start"
    assert not any((storage / "ray").glob("method_comparison-final")), "the final phase must not start"
