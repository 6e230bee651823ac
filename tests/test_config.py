"""Dotted-key configuration: defaults, method defaults, overrides and errors."""

import pytest

from semiseg.config import ConfigError, ExperimentConfig, coerce, parse_override


def test_flat_round_trip_and_method_defaults():
    cfg = ExperimentConfig.from_flat({"method.name": "mean_teacher", "optim.lr": "3e-4"})
    flat = cfg.to_flat()
    assert flat["optim.lr"] == pytest.approx(3e-4)
    assert flat["method.ema_decay"] == 0.95
    assert flat["method.pretrain_epochs"] == 0
    assert ExperimentConfig.from_flat(flat).to_flat() == flat


def test_unknown_keys_are_rejected_with_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'.*lr"):
        ExperimentConfig.from_flat({"optim.lrr": 1})
    with pytest.raises(ConfigError, match="method.ema_decay.*supervised"):
        ExperimentConfig.from_flat({"method.name": "supervised", "method.ema_decay": 0.9})
    with pytest.raises(ConfigError, match="unknown configuration key 'lr'"):
        ExperimentConfig.from_flat({"lr": 1})


def test_values_are_coerced_to_field_types():
    cfg = ExperimentConfig.from_flat({"train.max_epochs": "7", "train.amp": "true", "method.name": "mean_teacher",
                                      "method.consistency": "2.5"})
    assert cfg.train.max_epochs == 7 and cfg.train.amp is True
    assert cfg.method["consistency"] == 2.5
    with pytest.raises(ConfigError, match="train.max_epochs"):
        ExperimentConfig.from_flat({"train.max_epochs": "seven"})
    with pytest.raises(ConfigError):
        coerce(2.5, int, "x")


def test_parse_override():
    assert parse_override("optim.lr=1e-3") == ("optim.lr", "1e-3")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr")
