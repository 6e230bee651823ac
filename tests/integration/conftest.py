"""A real local Ray and a real MLflow store, started once per test session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_study(name: str):
    """Import ``studies/<name>.py`` (no work happens at import) and return its module."""
    spec = importlib.util.spec_from_file_location(f"study_{name}", REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local Ray with 2 CPUs whose workers see the test session's phantom cache (started as studies do)."""
    import ray

    from semiseg.tune.local_ray import init_ray

    cache = tmp_path_factory.mktemp("ray-phantom-cache")
    os.environ["SEMISEG_CACHE"] = str(cache)
    init_ray(None, num_cpus=2, log_to_driver=False, env_vars={"SEMISEG_CACHE": str(cache)})
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_store(tmp_path_factory) -> str:
    """A fresh SQLite MLflow store per test (absolute URI): tests count the runs they leave."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


def study_runs(tracking_uri: str, experiment: str):
    """(parent runs, child runs) of an experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("semiseg.role") == "study"]
    children = [r for r in runs if r.data.tags.get("semiseg.role") == "trial"]
    return client, parents, children
