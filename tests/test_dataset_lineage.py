"""A trial's data as the dataset input of its MLflow run: digest, case table, and what a run logs."""

from __future__ import annotations

import json
from pathlib import Path

from semiseg.data.source import dataset_handover, prepare_cache, resolve_dataset
from semiseg.data.splits import ROLES, Split
from semiseg.methods.registry import experiment_config
from semiseg.tracking import DATASET_TABLE_ARTIFACT, TAG_CACHE_KEY, TAG_SPLIT, Tracker
from semiseg.train.contract import DATASET_KEY
from semiseg.tune.lineage import DIGEST_LENGTH, case_table, lineage_digest, trial_lineage

SPLIT = Split(labelled=("a", "b"), unlabelled=("c", "d", "e"), validation=("f",), test=("g",))
KEY = "0" * 64


def test_digest_changes_with_the_split_and_with_the_cache_key():
    moved = Split(labelled=("a", "c"), unlabelled=("b", "d", "e"), validation=("f",), test=("g",))
    digest = lineage_digest(KEY, SPLIT)
    assert len(digest) == DIGEST_LENGTH and int(digest, 16) >= 0
    assert lineage_digest(KEY, SPLIT) == digest, "the same data gives the same digest"
    assert lineage_digest(KEY, moved) != digest
    assert lineage_digest("1" + KEY[1:], SPLIT) != digest


def test_case_table_has_every_case_once_with_its_role():
    table = case_table(SPLIT)
    assert sorted(table) == ["case_id", "role"]
    assert sorted(table["case_id"]) == list("abcdefg")
    assert dict(zip(table["case_id"], table["role"])) == {case: SPLIT.role_of(case) for case in "abcdefg"}
    assert table["role"] == sorted(table["role"], key=ROLES.index), "rows grouped by role"


def _trial_config(flat: dict) -> dict:
    """A trial's config as the study driver makes it: a prepared cache handed over."""
    cfg = experiment_config(flat)
    info = prepare_cache(cfg.data, resolve_dataset(cfg.data))
    return {**flat, DATASET_KEY: dataset_handover(cfg.data, info)}


def test_trial_lineage_is_the_split_the_trial_trains_on(tiny_config):
    from semiseg.data.source import configured_split

    config = _trial_config(tiny_config)
    lineage = trial_lineage(config, "Phantom")
    trained = configured_split(experiment_config(tiny_config).data, config[DATASET_KEY]).split
    assert lineage is not None and lineage.split == trained
    assert lineage.name == "Phantom" and lineage.cache_key == config[DATASET_KEY]["key"]
    assert lineage.source.startswith("file:///") and Path(lineage.source[len("file://"):]).is_dir()
    other_split = trial_lineage({**config, "data.split": 1}, "Phantom")
    fewer_labelled = trial_lineage({**config, "data.num_labelled": 1}, "Phantom")
    digests = {lineage.digest, other_split.digest, fewer_labelled.digest}
    assert len(digests) == 3, "another split of the same cache has another digest"
    assert other_split.split_name == "1" and other_split.cache_key == lineage.cache_key


def test_no_lineage_without_a_handover_or_for_other_preprocessing(tiny_config):
    config = _trial_config(tiny_config)
    assert trial_lineage(tiny_config) is None
    assert trial_lineage({**config, "data.normalisation": "zscore_nonzero"}) is None


def test_a_run_gets_the_dataset_input_and_its_case_table(tiny_config, tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", artifact_root=tmp_path / "artifacts")
    run = tracker.start_run(tracker.experiment_id("study"), "trial", {})
    lineage = trial_lineage(_trial_config(tiny_config), "Phantom")
    lineage.log(tracker, run)
    (logged,) = tracker.client.get_run(run).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("Phantom", lineage.digest)
    assert logged.dataset.source_type == "local" and lineage.source in logged.dataset.source
    tags = {tag.key: tag.value for tag in logged.tags}
    assert tags == {"mlflow.data.context": "training", TAG_CACHE_KEY: lineage.cache_key, TAG_SPLIT: "0"}
    stored = json.loads(Path(tracker.client.download_artifacts(run, DATASET_TABLE_ARTIFACT, str(tmp_path))).read_text())
    case, role = stored["columns"].index("case_id"), stored["columns"].index("role")
    rows = {row[case]: row[role] for row in stored["data"]}
    assert rows == {case_id: lineage.split.role_of(case_id) for case_id in rows}
    assert len(rows) == sum(len(ids) for ids in lineage.split.roles().values())
