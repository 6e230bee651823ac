"""Settings shared by the study scripts: the embedded phantom defaults and the smoke size."""

from __future__ import annotations

SMOKE = {
    "data.phantom_cases": 16,
    "data.phantom_shape": "48x48x6",
    "data.num_labelled": 2,
    "data.num_validation": 3,
    "data.num_test": 3,
    "train.max_epochs": 3,
    "train.steps_per_epoch": 4,
    "train.batch_size": 4,
    "train.labelled_per_batch": 2,
    "model.width": 8,
    "model.depth": 2,
    "schedule.rampup_epochs": 1.0,
}
