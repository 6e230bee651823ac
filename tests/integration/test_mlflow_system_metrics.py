"""Trial runs of a real study on a real MLflow store: system metrics, the dataset input, the experiment's kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semiseg.data.source import configured_split
from semiseg.data.splits import Split
from semiseg.tracking import DATASET_TABLE_ARTIFACT, TAG_CACHE_KEY, TAG_EXPERIMENT_KIND
from semiseg.train.contract import DATASET_KEY, config_from_trial
from semiseg.tune import run_study
from semiseg.tune.lineage import lineage_digest
from tests.integration.conftest import load_study, study_runs
from tests.integration.test_study_on_ray import TINY

pytestmark = pytest.mark.integration
SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


def _trial_params(storage: Path, trial_id: str) -> dict:
    """The config Tune gave the trial (its ``params.json``)."""
    (path,) = storage.glob(f"ray/*/trial_{trial_id}/params.json")
    return json.loads(path.read_text())


def _case_roles(client, run_id: str, folder: Path) -> dict[str, str]:
    stored = json.loads(Path(client.download_artifacts(run_id, DATASET_TABLE_ARTIFACT, str(folder))).read_text())
    case, role = stored["columns"].index("case_id"), stored["columns"].index("role")
    return {row[case]: row[role] for row in stored["data"]}


def test_trial_runs_have_system_metrics_and_their_data_as_input(ray_local, mlflow_store, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMISEG_SYSTEM_METRICS_INTERVAL", "1")
    study = load_study("ema_sweep").STUDY
    run_study(study, ["--storage-path", str(tmp_path), "--tracking-uri", mlflow_store, *TINY, "--num-samples", "1",
                      "--max-epochs", "2", "--skip-baselines", "--final-seeds", "1", "--final-splits", "2"])
    client, (parent,), children = study_runs(mlflow_store, "ema_sweep")
    assert len(children) == 3, "one searched trial, then the best on 2 splits"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[TAG_EXPERIMENT_KIND] == "custom_model_development"

    digests = {}
    for child in children:
        run_id = child.info.run_id
        for name in SYSTEM_METRICS:
            history = client.get_metric_history(run_id, name)
            assert history and all(m.value > 0 for m in history if "memory" in name), (name, child.info.run_name)
        (dataset_input,) = child.inputs.dataset_inputs
        dataset, tags = dataset_input.dataset, {t.key: t.value for t in dataset_input.tags}
        assert dataset.name == parent.data.tags["semiseg.dataset"]
        params = _trial_params(tmp_path, child.data.tags["semiseg.trial_id"])
        trained = configured_split(config_from_trial(params).data, params[DATASET_KEY]).split
        assert tags[TAG_CACHE_KEY] == params[DATASET_KEY]["key"]
        assert dataset.digest == lineage_digest(params[DATASET_KEY]["key"], trained)
        roles = _case_roles(client, run_id, tmp_path / run_id)
        assert Split(**{role: tuple(sorted(c for c, r in roles.items() if r == role))
                        for role in trained.roles()}) == trained
        digests[(child.data.tags["semiseg.phase"], child.data.params["data.split"])] = dataset.digest
    assert digests[("final", "0")] == digests[("search-mean_teacher", "0")], "same data and split, same digest"
    assert digests[("final", "1")] != digests[("final", "0")], "another split, another digest"
