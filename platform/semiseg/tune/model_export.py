"""Every model a study trained to the end, kept as a bundle in the study's folder and beside its MLflow run.

A finished study writes ``<state_dir>/<study>/models/``:

- one bundle (:mod:`semiseg.inference.bundle`) per final-phase trial, at
  ``models/<group>/split<k>-seed<s>-<trial>/model.pt``: the best validation epoch's evaluation
  network with its spec (preprocessing, labels, sliding windows, the post-processing chosen on
  validation) and where it came from (method, group, split, seed, validation Dice); without a
  final phase, the best searched trial of each method;
- ``index.json``: ``{"study", "best": {method: path}, "models": [{path, method, group, phase, seed,
  split, val_dice, trial_id}]}`` with paths relative to the study folder. ``semiseg-predict --model
  <study folder>`` reads it: the best model of a method, or ``--ensemble`` over its final-phase
  models (seeds and splits).

The same file is logged as the artifact ``semiseg_model/model.pt`` of the trial's MLflow run, so
``semiseg-predict --model runs:/<run id>`` and ``models:/<registered name>/<version>`` find it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from semiseg.inference.bundle import save_bundle
from semiseg.tracking import TAG_PHASE, TAG_TRIAL_ID, Tracker
from semiseg.train.contract import CHECKPOINT_FILE
from semiseg.tune.results import TrialRow, group_label

log = logging.getLogger(__name__)

MODELS_FOLDER = "models"
INDEX_FILE = "index.json"
MLFLOW_ARTIFACT = "semiseg_model"
"""The artifact folder of a trial's MLflow run that holds its bundle ``model.pt``."""


def read_checkpoint_model(checkpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model spec and the best epoch's evaluation weights saved in a trial checkpoint.

    Args:
        checkpoint: The checkpoint's URI (``TrialRow.checkpoint``).

    Returns:
        ``(model_spec, best_eval_state)``.

    Raises:
        ValueError: the checkpoint holds no best model or no model spec.
    """
    from ray.tune import Checkpoint

    with Checkpoint(checkpoint).as_directory() as folder:
        payload = torch.load(f"{folder}/{CHECKPOINT_FILE}", map_location="cpu", weights_only=True)
    spec, state = payload.get("model_spec"), payload.get("best_eval_state")
    if spec is None or state is None:
        raise ValueError(f"checkpoint {checkpoint} holds no best model")
    return spec, state


def exported_rows(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """The trials a study keeps models of: its completed final-phase trials, or, without any, the
    best searched trial of each method (highest validation Dice)."""
    usable = [r for r in rows if r.status == "completed" and r.checkpoint and not math.isnan(r.best_val_dice)]
    final = [r for r in usable if r.phase == "final"]
    if final:
        return final
    best: dict[str, TrialRow] = {}
    for row in usable:
        if row.method not in best or row.best_val_dice > best[row.method].best_val_dice:
            best[row.method] = row
    return [best[method] for method in sorted(best)]


def export_models(rows: Sequence[TrialRow], study_dir: Path, study: str, group_by: Sequence[str] = (),
                  tracker: Tracker | None = None, experiment_id: str | None = None) -> Path | None:
    """Write the bundles and ``index.json`` of a finished study (see the module docstring).

    A trial whose checkpoint cannot be read is warned about and left out: a study never fails on
    its export. With ``tracker``, each bundle is also logged to its trial's MLflow run.

    Returns:
        The index file, or None when no model could be exported.
    """
    entries: list[dict[str, Any]] = []
    for row in exported_rows(rows):
        seed, split = row.config.get("train.seed"), int(row.config.get("data.split", 0) or 0)
        group = group_label(row, group_by)
        relative = f"{MODELS_FOLDER}/{_slug(group)}/split{split}-seed{seed}-{row.trial_id}/model.pt"
        info = {"method": row.method, "group": group, "phase": row.phase, "seed": seed, "split": split,
                "val_dice": row.best_val_dice, "trial_id": row.trial_id}
        try:
            spec, state = read_checkpoint_model(row.checkpoint)
            path = save_bundle(study_dir / relative, spec, state, info)
        except Exception as error:  # noqa: BLE001 - the export is a convenience, never a study failure
            log.warning("warning: could not keep the model of trial %s (%s)", row.trial_id, error)
            continue
        entries.append({"path": relative, **info})
        if tracker is not None and tracker.enabled and experiment_id is not None:
            run_id = tracker.find_run(experiment_id, {TAG_TRIAL_ID: row.trial_id, TAG_PHASE: row.phase})
            if run_id is not None:
                tracker.log_file(run_id, path, MLFLOW_ARTIFACT)
    if not entries:
        return None
    best: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry["method"] not in best or entry["val_dice"] > best[entry["method"]]["val_dice"]:
            best[entry["method"]] = entry
    index = {"study": study, "best": {method: entry["path"] for method, entry in sorted(best.items())},
             "models": entries}
    target = study_dir / MODELS_FOLDER / INDEX_FILE
    temporary = target.with_name(f".{INDEX_FILE}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(index, indent=2))
    os.replace(temporary, target)
    return target


def _slug(text: str) -> str:
    """A folder name for a group label.

    ``mean_teacher [data.num_labelled=2]`` becomes ``mean_teacher-data.num_labelled-2``.
    """
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "model"
