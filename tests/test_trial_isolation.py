"""Trials reuse their processes (Tune ``reuse_actors``): a trial must not depend on what ran before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = """
import json, sys
import torch
from semiseg.train.loop import run_training
from semiseg.train.session import LocalSession
configs = json.loads(sys.argv[1])
for config in configs:
    session = LocalSession()
    run_training(config, session)
print(json.dumps([[r["train/loss"], r["val/dice"], r["test/dice"] if "test/dice" in r else None]
                  for r in session.reports]))
"""


def _reports_of_last(configs: list[dict], cache: Path) -> list:
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(configs)], capture_output=True, text=True,
                          env={**os.environ, "SEMISEG_CACHE": str(cache)}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_trial_after_other_trials_in_one_process_equals_it_in_a_fresh_process(tiny_config, cache_dir):
    trial = {**tiny_config, "method.name": "mean_teacher", "train.seed": 3, "train.threads": 1}
    before = [{**tiny_config, "method.name": "cross_pseudo_supervision", "train.seed": 1, "train.threads": 2,
               "optim.lr": 0.01},
              {**tiny_config, "method.name": "ua_mean_teacher", "train.seed": 2, "train.threads": 1}]
    fresh = _reports_of_last([trial], cache_dir)
    reused = _reports_of_last([*before, trial], cache_dir)
    assert reused == fresh, "a reused trial process changed the trial's results"
    assert len(fresh) == tiny_config["train.max_epochs"] and fresh[-1][2] is not None
