"""A study whose driver is killed mid-search and resumed stops the trials an uninterrupted one stops.

One trial at a time, random draws only (every trial is one of TPE's start-up trials, so the
configurations follow the seed, not the results) and CPU training (bit-identical results,
checkpoints with their RNG states): the two runs see the same results in the same order, and
ASHA's decisions may differ only through what the scheduler remembers across the restore.

Tune snapshots its experiment (trials and searcher) at every step here
(``TUNE_GLOBAL_CHECKPOINT_S=0``; by default at most every 10 s). A trial that Optuna's storage
has finished but the last snapshot lacks is run again after the resume, and counts twice among
TPE's start-up trials, so later suggestions differ from the uninterrupted run's: a property of
the searcher's resume, not of ASHA's (whose handling of such lost trials tests/test_asha_state.py
covers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semiseg.tune.presets import SMOKE

pytestmark = pytest.mark.integration
NUM_SAMPLES = 6
MAX_EPOCHS = 4
KILL_WHEN_TRIAL_STARTS = 3
"""The driver is killed once the third trial has a checkpoint: ASHA's rungs hold two trials."""
BASE = {**SMOKE, "method.name": "supervised", "train.max_epochs": MAX_EPOCHS, "train.steps_per_epoch": 16}
STUDY_SCRIPT = f'''
from semiseg.tune import Study, run_study

STUDY = Study(name="asha_resume", description="ASHA across a killed driver", base={json.dumps(BASE)},
              methods={{"supervised": ["optim.lr"]}}, ranges={{"optim.lr": (1e-4, 3e-2)}},
              num_samples={NUM_SAMPLES}, startup_trials={NUM_SAMPLES}, grace_period=1, reduction_factor=2)

if __name__ == "__main__":
    run_study(STUDY)
'''


def _command(folder: Path, script: Path) -> list[str]:
    return [sys.executable, str(script), "--storage-path", str(folder), "--tracking-uri",
            f"sqlite:///{folder / 'mlflow.db'}", "--max-concurrent", "1", "--skip-baselines", "--seed", "7"]


def _env(folder: Path) -> dict[str, str]:
    return {**os.environ, "SEMISEG_CACHE": str(folder.parent / "cache"), "TUNE_GLOBAL_CHECKPOINT_S": "0"}


def _trials(folder: Path) -> dict[float, tuple[str, int]]:
    """Learning rate → (status, epochs) of each searched trial, from the study's ``results.json``."""
    results = json.loads((folder / "asha_resume" / "results.json").read_text())
    return {trial["config"]["optim.lr"]: (trial["status"], trial["epochs"]) for trial in results["trials"]
            if trial["phase"].startswith("search")}


def _started_trials(folder: Path) -> list[Path]:
    return [trial for trial in (folder / "ray").glob("asha_resume-search-*/trial_*") if any(trial.glob("checkpoint_*"))]


def test_a_killed_and_resumed_search_stops_the_trials_an_uninterrupted_one_stops(tmp_path):
    script = tmp_path / "asha_resume.py"
    script.write_text(STUDY_SCRIPT)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(_command(whole, script), env=_env(whole), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    uninterrupted = _trials(whole)
    assert len(uninterrupted) == NUM_SAMPLES
    stopped = {lr: epochs for lr, (status, epochs) in uninterrupted.items() if status == "stopped_early"}
    assert stopped, f"ASHA stopped no trial: nothing to compare ({uninterrupted})"

    first = subprocess.Popen(_command(killed, script), env=_env(killed), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while first.poll() is None and len(_started_trials(killed)) < KILL_WHEN_TRIAL_STARTS:
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (killed / "asha_resume" / "results.json").exists(), "the study finished before it was killed"
    asha_state = json.loads((killed / "asha_resume" / "asha" / "search-supervised.json").read_text())
    assert asha_state["rungs"][0][-1][1], "the rungs were empty when the driver died"

    resumed = subprocess.run([*_command(killed, script), "--resume"], env=_env(killed), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming search-supervised" in resumed.stdout
    assert _trials(killed) == uninterrupted
