"""Every study script runs with --smoke on a real local Ray and leaves consistent MLflow runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from semiseg.tune import run_study
from tests.integration.conftest import REPO, load_study, study_runs

pytestmark = pytest.mark.integration
STUDIES = sorted(p.stem for p in (REPO / "studies").glob("*.py"))
DETAILED_ELSEWHERE = {"ema_sweep"}  # tests/integration/test_study_on_ray.py runs it with --smoke and checks more
TINY = ["--smoke", "--set", "data.phantom_shape=32x32x4", "--set", "data.phantom_cases=14",
        "--set", "data.num_validation=2", "--set", "data.num_test=2", "--set", "model.width=4",
        "--set", "train.max_epochs=2"]


def test_every_study_script_is_listed():
    assert {"ema_sweep", "consistency_weight_sweep", "rampup_sweep", "lr_sweep", "pretrain_length_sweep",
            "method_comparison", "label_efficiency"} <= set(STUDIES)


@pytest.mark.parametrize("name", [name for name in STUDIES if name not in DETAILED_ELSEWHERE])
def test_study_smoke(name, ray_local, mlflow_store, tmp_path: Path):
    study = load_study(name).STUDY
    outcome = run_study(study, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store, *TINY])
    assert outcome.rows, "a study must run trials"
    assert all(row.status in ("completed", "stopped_early") for row in outcome.rows), \
        [(r.trial_id, r.status) for r in outcome.rows]
    assert outcome.final, "every study ends with a final table"
    for group, metrics in outcome.final.items():
        assert 0.0 <= metrics["dice"][0] <= 1.0, group
    client, parents, children = study_runs(mlflow_store, study.name)
    (parent,) = parents
    mine = [c for c in children if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(mine) == len(outcome.rows), "one child run per trial, none duplicated"
    assert len({c.data.tags["semiseg.trial_id"] for c in mine}) == len(mine)
    assert all(c.info.status == "FINISHED" for c in mine)
