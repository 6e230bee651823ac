"""Shared fixtures: a small on-disk phantom and a config for fast loop runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TINY = {
    "data.phantom_cases": 12,
    "data.phantom_shape": "32x32x4",
    "data.num_labelled": 2,
    "data.num_validation": 2,
    "data.num_test": 2,
    "train.max_epochs": 2,
    "train.steps_per_epoch": 2,
    "train.batch_size": 4,
    "train.labelled_per_batch": 2,
    "model.width": 4,
    "model.depth": 2,
    "schedule.rampup_epochs": 1.0,
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A per-session cache for generated phantoms (also exported to Ray workers)."""
    folder = tmp_path_factory.mktemp("semiseg-cache")
    os.environ["SEMISEG_CACHE"] = str(folder)
    return folder


@pytest.fixture()
def tiny_config(cache_dir) -> dict:
    """Flat overrides for a seconds-long training run on a tiny phantom."""
    return dict(TINY)
