"""The dataset resolved, fingerprinted and preprocessed once on the study driver, handed to the trials."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from semiseg.data import cache as cache_module
from semiseg.data import source as source_module
from semiseg.data.source import configured_split, dataset_handover, prepare_cache, resolve_dataset
from semiseg.methods.registry import experiment_config
from semiseg.train.contract import DATASET_KEY
from semiseg.train.loop import run_training
from semiseg.train.session import LocalSession


def _driver(flat: dict):
    """What the study driver does: resolve, build the cache, hand it over."""
    cfg = experiment_config(flat)
    info = prepare_cache(cfg.data, resolve_dataset(cfg.data))
    return cfg.data, info, dataset_handover(cfg.data, info)


def _no_rescan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make listing or fingerprinting the dataset fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the trial scanned or fingerprinted the dataset again")

    monkeypatch.setattr(source_module, "resolve_dataset", refuse)
    monkeypatch.setattr(cache_module, "file_fingerprint", refuse)


def _same(a, b) -> None:
    assert a.split == b.split and a.class_ids == b.class_ids and a.in_channels == b.in_channels
    assert a.training_spacing == b.training_spacing
    for name in ("labelled_images", "labelled_labels", "unlabelled_images"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for role in ("validation", "test"):
        assert [c.case_id for c in getattr(a, role)] == [c.case_id for c in getattr(b, role)]
        for x, y in zip(getattr(a, role), getattr(b, role)):
            np.testing.assert_array_equal(x.image, y.image)
            np.testing.assert_array_equal(x.label, y.label)
            assert x.spacing == y.spacing


@pytest.mark.parametrize("overrides", [{}, {"data.dims": 3, "data.phantom_shape": "32x32x8"},
                                       {"data.loader": "stream"}])
def test_a_handed_cache_gives_the_same_split_without_scanning_the_dataset(tiny_config, monkeypatch, overrides):
    data, _, handover = _driver({**tiny_config, **overrides})
    resolved = configured_split(data)
    _no_rescan(monkeypatch)
    handed = configured_split(data, handover)
    assert (handed.unlabelled_stream is None) == (resolved.unlabelled_stream is None)
    _same(handed, resolved)


def test_a_trial_opens_the_handed_cache(tiny_config, monkeypatch):
    config = {**tiny_config, "method.name": "supervised", "train.max_epochs": 1}
    _, _, handover = _driver(config)
    straight = LocalSession()
    run_training(config, straight)
    _no_rescan(monkeypatch)
    handed = LocalSession()
    run_training({**config, DATASET_KEY: handover}, handed)
    assert handed.reports[-1]["val/dice"] == pytest.approx(straight.reports[-1]["val/dice"], rel=1e-6)


def test_other_data_settings_resolve_the_dataset_again(tiny_config, monkeypatch):
    _, _, handover = _driver(tiny_config)
    other = experiment_config({**tiny_config, "data.normalisation": "zscore_nonzero"}).data
    calls = []
    real = source_module.resolve_dataset
    monkeypatch.setattr(source_module, "resolve_dataset", lambda data: calls.append(data) or real(data))
    configured_split(other, handover)
    assert calls == [other], "a handover made for other settings must not be used"


def test_a_missing_or_replaced_cache_is_rebuilt_as_without_a_handover(tiny_config, monkeypatch):
    data, info, handover = _driver(tiny_config)
    expected = configured_split(data)
    calls = []
    real = source_module.resolve_dataset
    monkeypatch.setattr(source_module, "resolve_dataset", lambda d: calls.append(d) or real(d))

    shutil.rmtree(info.path)
    _same(configured_split(data, handover), expected)
    assert len(calls) == 1 and (info.path / "manifest.json").is_file(), "the cache is rebuilt where it was"

    manifest = json.loads((info.path / "manifest.json").read_text())
    (info.path / "manifest.json").write_text(json.dumps({**manifest, "key": "0" * 64}))
    _same(configured_split(data, handover), expected)
    assert len(calls) == 2, "a cache holding another key is not taken for the handed one"
