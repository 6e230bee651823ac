"""Which data a trial trained on, as MLflow shows it: the dataset input of its run.

A trial's data is the study's prepared cache (the driver's handover, under
:data:`semiseg.train.contract.DATASET_KEY`) and the split of it its data settings select
(:func:`semiseg.data.splits.select_split`, as the trial computes it). The input's digest
covers both, so two runs on other data, other preprocessing or another split never show the
same digest in the UI; the cache key itself is a tag of the input, and the case ids with
their roles are the run's table :data:`semiseg.tracking.DATASET_TABLE_ARTIFACT`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from semiseg.config import ConfigError
from semiseg.data.errors import DatasetError
from semiseg.data.source import open_handover
from semiseg.data.splits import ROLES, Split, select_split
from semiseg.tracking import TAG_CACHE_KEY, TAG_SPLIT, Tracker
from semiseg.train.contract import DATASET_KEY, config_from_trial

log = logging.getLogger(__name__)
DIGEST_LENGTH = 16
"""Hex characters of a dataset digest (MLflow stores at most 36)."""


def lineage_digest(cache_key: str, split: Split) -> str:
    """Short digest of a cache key and a split's case ids per role: it changes with either."""
    payload = json.dumps({"cache_key": cache_key, "split": split.roles()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:DIGEST_LENGTH]


def case_table(split: Split) -> dict[str, list[str]]:
    """One row per case of ``split``: ``{"case_id": [...], "role": [...]}``, by role, then by id."""
    rows = [(case_id, role) for role in ROLES for case_id in sorted(getattr(split, role))]
    return {"case_id": [case_id for case_id, _ in rows], "role": [role for _, role in rows]}


@dataclass(frozen=True)
class DatasetLineage:
    """A trial's data: the dataset, its prepared cache and the split.

    Attributes:
        name: The dataset's name.
        source: Where the dataset lies (a folder as a ``file://`` URI).
        cache_key: The prepared cache's key (preprocessing and files).
        split: Which cases play which role.
        split_name: ``data.split`` and its splits file, as the trial configured them.
    """

    name: str
    source: str
    cache_key: str
    split: Split
    split_name: str

    @property
    def digest(self) -> str:
        """:func:`lineage_digest` of the cache key and the split."""
        return lineage_digest(self.cache_key, self.split)

    def log(self, tracker: Tracker, run_id: str) -> None:
        """Log as the run's dataset input, with the case table."""
        tracker.log_dataset(run_id, self.name, self.source, self.digest, case_table(self.split),
                            {TAG_CACHE_KEY: self.cache_key, TAG_SPLIT: self.split_name})


def trial_lineage(config: Mapping[str, Any], dataset_name: str | None = None) -> DatasetLineage | None:
    """The lineage of a trial config, on the study driver; None (logged) when the driver cannot know it.

    Reads the handed-over cache's manifest (not its data). None when the trial has no handover,
    or its data settings prepare another cache than the driver's (a searched preprocessing key:
    the trial prepares that one itself), or its split cannot be drawn (the trial reports that).

    Args:
        config: The trial's config (as Tune holds it).
        dataset_name: The study's name of the dataset; the cache's own when None.
    """
    try:
        data = config_from_trial(config).data
        dataset = open_handover(data, config.get(DATASET_KEY))
        if dataset is None:
            log.info("no dataset input: the trial prepares its data itself")
            return None
        split = select_split(dataset.labelled_ids, dataset.unlabelled_ids, num_labelled=data.num_labelled,
                             num_validation=data.num_validation, num_test=data.num_test, seed=data.split_seed,
                             index=data.split, splits_file=data.splits_file)
    except (ConfigError, DatasetError) as error:
        log.warning("no dataset input for a trial: %s", error)
        return None
    manifest = dataset.manifest
    root = str(manifest.get("root") or dataset.path)
    source = Path(root).as_uri() if Path(root).is_absolute() else root
    split_name = str(data.split) + (f" of {data.splits_file}" if data.splits_file else "")
    return DatasetLineage(dataset_name or str(manifest.get("name", "dataset")), source, str(manifest["key"]),
                          split, split_name)
