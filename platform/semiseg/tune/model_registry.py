"""The best model of each method, logged with its config and registered in MLflow's model registry."""

from __future__ import annotations

import logging
import math
import warnings
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import semiseg
from semiseg.models.evaluation import build_evaluation_network
from semiseg.tracking import TAG_PHASE, TAG_TRIAL_ID, Tracker, quiet_run_links, scrub
from semiseg.tune.model_export import read_checkpoint_model
from semiseg.tune.results import TrialRow

log = logging.getLogger(__name__)


def registered_model_name(study: str, method: str) -> str:
    """``semiseg-<study>-<method>``."""
    return f"semiseg-{study}-{method}"


def best_rows_by_method(rows: Sequence[TrialRow]) -> dict[str, TrialRow]:
    """For each method, its completed trial with the highest validation Dice that has a checkpoint.

    Final-phase trials are preferred (they ran to the end); searched trials otherwise.
    """
    best: dict[str, TrialRow] = {}
    for row in rows:
        if row.status != "completed" or not row.checkpoint or math.isnan(row.best_val_dice):
            continue
        current = best.get(row.method)
        key = (row.phase == "final", row.best_val_dice)
        if current is None or key > (current.phase == "final", current.best_val_dice):
            best[row.method] = row
    return best


SERVING_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "cloudpickle")
"""What a pickled network needs to be served by ``mlflow.pyfunc``; ``semiseg`` travels as code."""


def serving_requirements() -> list[str]:
    """Pinned pip requirements of a logged model, from the installed versions.

    Given explicitly so that MLflow does not infer them: its inference imports the model
    in a subprocess, which cost about 6 s per logged model (0.3 s with this list), and it
    listed ``semiseg`` itself, which is not installable from an index.
    """
    pins = []
    for package in SERVING_PACKAGES:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{package}=={version.split('+')[0]}")
    return pins


def load_best_model(row: TrialRow) -> tuple[torch.nn.Module, np.ndarray]:
    """The evaluation network of ``row`` at its best validation epoch, rebuilt from its checkpoint.

    Returns:
        The network in eval mode and an input example (zeros of a size every depth accepts).

    Raises:
        ValueError: the checkpoint has no best model or model description.
    """
    spec, state = read_checkpoint_model(row.checkpoint)
    model_cfg = spec["model"]
    network = build_evaluation_network(spec)
    network.load_state_dict(state)
    side = 2 ** (int(model_cfg["depth"]) + 1)
    example = np.zeros((1, spec["in_channels"], *([side] * int(spec["dims"]))), dtype=np.float32)
    return network.eval(), example


def register_best_models(rows: Sequence[TrialRow], tracker: Tracker, experiment_id: str | None,
                         study: str) -> list[str]:
    """Log and register the best model of each method; return the registered names.

    The model is logged (``mlflow.pytorch``) into the child run of its trial, so its params
    and ``config.json`` sit beside it, and registered as ``semiseg-<study>-<method>``.
    Failures warn and skip: a study never fails on its registry.
    """
    if not tracker.enabled or experiment_id is None:
        return []
    import mlflow
    import mlflow.pytorch

    registered = []
    requirements = serving_requirements()
    with _fluent_tracking_uri(tracker.tracking_uri), quiet_run_links(tracker.tracking_uri):
        for method, row in sorted(best_rows_by_method(rows).items()):
            run_id = tracker.find_run(experiment_id, {TAG_TRIAL_ID: row.trial_id, TAG_PHASE: row.phase})
            if run_id is None:
                continue
            name = registered_model_name(study, method)
            try:
                network, example = load_best_model(row)
                with mlflow.start_run(run_id=run_id):
                    mlflow.pytorch.log_model(network, name="model", registered_model_name=name,
                                             serialization_format="pickle", input_example=example,
                                             pip_requirements=requirements,
                                             code_paths=[str(Path(semiseg.__file__).parent)])
                registered.append(name)
            except Exception as error:  # noqa: BLE001 - the registry is a convenience, never a failure
                warnings.warn(f"could not register the best {method} model "
                              f"({scrub(str(error), tracker.tracking_uri)})", RuntimeWarning, stacklevel=2)
    return registered


def _fluent_tracking_uri(uri: str):
    """MLflow's global tracking URI set to ``uri`` while inside, the previous one back after.

    MLflow also exports it as ``MLFLOW_TRACKING_URI``, which every later subprocess of the driver
    would inherit with the URI's credentials. (Left set, as before, if MLflow moved its helper.)
    """
    import contextlib

    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:
        mlflow.set_tracking_uri(uri)
        return contextlib.nullcontext()
    return _use_tracking_uri(uri)
